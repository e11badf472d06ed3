"""`python -m stages.train_prior`: the `train_prior` stage declared in dalle.train.prior."""
from dalle.train.prior import STAGE

if __name__ == "__main__":
    STAGE.main()
