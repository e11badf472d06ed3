"""`python -m stages.collect`: the `collect` stage declared in dalle.data.collect."""
from dalle.data.collect import STAGE

if __name__ == "__main__":
    STAGE.main()
