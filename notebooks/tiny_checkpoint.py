"""A tiny random Jais2 checkpoint in the HF layout, so the notebooks run without a download.

`make_tiny_checkpoint(folder)` builds a random `transformers.Jais2ForCausalLM`, writes it with
`save_pretrained` and puts a tokenizer beside it: the one bundled in `data/tokenizer` (a
1024-token byte-level BPE trained on `data/corpus`), or, when the repository's data files are not
there, one trained here on a few sentences. A small chat template is added so that the chat cells
run; released checkpoints bring their own.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jais2_jax

BUNDLED_TOKENIZER = Path(jais2_jax.__file__).resolve().parents[1] / "data" / "tokenizer"
SPECIAL = ("<|pad|>", "<|bos|>", "<|eos|>")  # ids 0, 1, 2, as in the bundled tokenizer
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}### assistant:\n{% endif %}")
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _write_tokenizer(folder: Path) -> None:
    if (BUNDLED_TOKENIZER / "tokenizer.json").exists():
        shutil.copy(BUNDLED_TOKENIZER / "tokenizer.json", folder)
        config = json.loads((BUNDLED_TOKENIZER / "tokenizer_config.json").read_text())
    else:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=TINY["vocab_size"], special_tokens=list(SPECIAL),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        text = ["The desert at dawn is quiet and cold.", "A good teacher listens first.",
                "الصحراء عند الفجر هادئة وباردة.", "كان البحر دائما قريبا من المدينة."]
        tok.train_from_iterator(text * 8, trainer)
        tok.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": SPECIAL[0],
                  "bos_token": SPECIAL[1], "eos_token": SPECIAL[2]}
    config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def make_tiny_checkpoint(folder, *, seed: int = 0, randomize_biases: bool = True,
                         max_shard_size: str = "5GB", **config_overrides) -> Path:
    """Writes a random tiny HF Jais2 checkpoint (config.json, safetensors, tokenizer) to `folder`
    and returns its path. `config_overrides` go to `transformers.Jais2Config`; a small
    `max_shard_size` ("100KB") splits the weights into several files, as large checkpoints are.

    randomize_biases: biases and norm parameters get noise too (transformers initialises them to
    0 and 1, which would hide a mistake in mapping them)."""
    import torch
    import transformers

    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} exists")
    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" bars
    torch.manual_seed(seed)
    model = transformers.Jais2ForCausalLM(transformers.Jais2Config(**{**TINY, **config_overrides}))
    if randomize_biases:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    _write_tokenizer(tmp)
    os.replace(tmp, folder)
    return folder
