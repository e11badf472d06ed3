"""`python -m stages.generate`: the `generate` stage declared in dalle.generate."""
from dalle.generate import STAGE

if __name__ == "__main__":
    STAGE.main()
