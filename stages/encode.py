"""`python -m stages.encode`: the `encode` stage declared in dalle.tokens."""
from dalle.tokens import STAGE

if __name__ == "__main__":
    STAGE.main()
