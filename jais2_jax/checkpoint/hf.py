"""An HF checkpoint folder (config.json, safetensors weights, tokenizer files), read and checked
whole on opening."""

from __future__ import annotations

import json
import os

import numpy as np

from jais2_jax.checkpoint import hf_mapping
from jais2_jax.checkpoint.common import (
    INDEX_FILE,
    PICKLE_SUFFIXES,
    SINGLE_FILE,
    check_folder,
    regular_file_exists,
)
from jais2_jax.checkpoint.hf_mapping import TensorSpec, tensor_specs
from jais2_jax.checkpoint.safetensors_io import (
    SLAB_BYTES,
    StoredTensor,
    as_bits,
    read_header,
    read_ours,
    read_rows,
    row_bytes,
)
from jais2_jax.model.config import Jais2Config


def _weight_files(folder: str) -> list[str]:
    """The safetensors files of an HF folder, from index.json if there is one. Each must be a
    regular file (regular_file_exists: a named pipe would be waited on forever)."""
    index_path = os.path.join(folder, INDEX_FILE)
    if regular_file_exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index_path} is not a valid index ({e!r}); it needs a "
                             "'weight_map' of tensor name -> file name") from None
        for name in files:
            norm = os.path.normpath(str(name))
            if os.path.isabs(norm) or norm.split(os.sep)[0] == ".." or not norm.endswith(
                    ".safetensors"):
                raise ValueError(f"{index_path} names {name!r}, which is not a .safetensors file "
                                 f"inside {folder}")
            if not regular_file_exists(os.path.join(folder, norm)):
                raise FileNotFoundError(f"{index_path} names {name!r}, which does not exist in "
                                        f"{folder}")
        return [os.path.join(folder, os.path.normpath(n)) for n in files]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")
                   and regular_file_exists(os.path.join(folder, f)))
    if files:
        return [os.path.join(folder, f) for f in files]
    pickles = sorted(f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ValueError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); they are never unpickled "
            "here (loading a pickle can run arbitrary code). Get safetensors weights instead: "
            "download the model's *.safetensors files from the Hub (most models have them), or, "
            "in a trusted environment, `Jais2ForCausalLM.from_pretrained(folder)"
            ".save_pretrained(new_folder)` with transformers, which writes safetensors")
    raise FileNotFoundError(f"no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}) in {folder}")


class HFCheckpoint:
    """An HF checkpoint folder, fully checked on opening: config, files, names and shapes."""

    def __init__(self, path):
        self.folder = check_folder(path)
        self.config = Jais2Config.from_json_file(self.folder)
        self.tensors: dict[str, StoredTensor] = {}
        for file in _weight_files(self.folder):
            for name, t in read_header(file).items():
                if name in self.tensors:
                    raise ValueError(f"tensor {name} is stored twice: in {self.tensors[name].path} "
                                     f"and {file}")
                self.tensors[name] = t
        hf_mapping.check_hf_names(self.config, self.tensors)
        n = self.config.num_hidden_layers
        self.specs = tensor_specs(self.config)
        for spec in self.specs:
            for name in spec.hf_names(n):
                hf_mapping.check_hf_shape(spec, name, self.tensors[name].shape)
        dtypes = {self.tensors[name].dtype for s in self.specs for name in s.hf_names(n)}
        # The checkpoint's dtype (the widest if mixed; float32 for float16 with bfloat16, which
        # neither holds): what convert keeps by default.
        widest = max(d.itemsize for d in dtypes)
        wide = [d for d in dtypes if d.itemsize == widest]
        self.dtype = wide[0] if len(wide) == 1 else np.dtype(np.float32)
        if self.config.tie_word_embeddings and hf_mapping.TIED_HEAD in self.tensors:
            self._check_tied_head()

    def _check_tied_head(self) -> None:
        """A tied checkpoint's stored lm_head must equal the embedding (read a slab at a time)."""
        head, embed = self.tensors[hf_mapping.TIED_HEAD], self.tensors["model.embed_tokens.weight"]
        if head.shape != embed.shape or head.dtype != embed.dtype:
            raise hf_mapping.tied_head_differs()
        rows = max(1, SLAB_BYTES // max(1, row_bytes(head)))
        for r0 in range(0, head.shape[0], rows):
            r1 = min(r0 + rows, head.shape[0])
            if not np.array_equal(as_bits(read_rows(head, r0, r1)),
                                  as_bits(read_rows(embed, r0, r1))):
                raise hf_mapping.tied_head_differs()

    def read(self, spec: TensorSpec, box: tuple[slice, ...] | None = None) -> np.ndarray:
        """`spec`'s parameter in our layout (stored dtype), restricted to `box` of its full shape."""
        n = self.config.num_hidden_layers
        full = spec.full_shape(n)
        box = tuple(slice(0, d) for d in full) if box is None else box
        if not spec.stacked:
            return read_ours(spec, self.tensors[spec.hf_name], box)
        layers = range(box[0].start, box[0].stop)
        if len(layers) == 1:  # no copy into a stacked array
            return read_ours(spec, self.tensors[spec.hf_name.format(i=layers[0])], box[1:])[None]
        out = None
        for j, i in enumerate(layers):
            part = read_ours(spec, self.tensors[spec.hf_name.format(i=i)], box[1:])
            if out is None:
                out = np.empty((len(layers),) + part.shape, part.dtype)
            out[j] = part
        return out


