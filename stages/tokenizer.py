"""`python -m stages.tokenizer`: the `tokenizer` stage declared in dalle.data.tokenizer."""
from dalle.data.tokenizer import STAGE

if __name__ == "__main__":
    STAGE.main()
