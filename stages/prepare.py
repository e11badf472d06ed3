"""`python -m stages.prepare`: the `prepare` stage declared in dalle.data.prepare."""
from dalle.data.prepare import STAGE

if __name__ == "__main__":
    STAGE.main()
