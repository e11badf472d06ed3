"""`python -m stages.dedup`: the `dedup` stage declared in dalle.data.dedup."""
from dalle.data.dedup import STAGE

if __name__ == "__main__":
    STAGE.main()
