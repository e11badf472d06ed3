"""`python -m stages.train_clip`: the `train_clip` stage declared in dalle.train.clip."""
from dalle.train.clip import STAGE

if __name__ == "__main__":
    STAGE.main()
