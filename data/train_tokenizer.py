"""Trains the bundled byte-level BPE tokenizer on data/corpus (reproducible: same corpus, same file).

    python data/train_tokenizer.py            # writes data/tokenizer/{tokenizer,tokenizer_config}.json
"""

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB_SIZE = 1024
SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>"]  # ids 0, 1, 2 (configs/jais2-tiny.json agrees)


def main():
    corpus = sorted(os.path.join(HERE, "corpus", f) for f in os.listdir(os.path.join(HERE, "corpus")))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train(corpus, trainer)
    out = os.path.join(HERE, "tokenizer")
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": SPECIAL[0],
              "bos_token": SPECIAL[1], "eos_token": SPECIAL[2], "model_max_length": 512}
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
