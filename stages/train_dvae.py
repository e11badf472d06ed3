"""`python -m stages.train_dvae`: the `train_dvae` stage declared in dalle.train.dvae."""
from dalle.train.dvae import STAGE

if __name__ == "__main__":
    STAGE.main()
