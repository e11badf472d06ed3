"""`python -m stages.evaluate`: the `evaluate` stage declared in dalle.eval.evaluate."""
from dalle.eval.evaluate import STAGE

if __name__ == "__main__":
    STAGE.main()
