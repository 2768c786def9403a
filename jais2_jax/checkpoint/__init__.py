"""HF safetensors <-> Orbax checkpoints, streamed; either format loaded straight into a mesh.

Layouts on disk:
- HF folder: `config.json`, `model.safetensors` or shards named by `model.safetensors.index.json`,
  tokenizer files. Tensor names and the [out, in] <-> ours reshapes live in `hf_mapping` only.
- Orbax folder (ours): `config.json`, tokenizer files, and `params/`: one Orbax PyTree checkpoint
  (OCDBT, zarr, uncompressed: zstd on weights costs more time than the ~10% it saves) of our scanned
  parameter tree; `ocp.StandardCheckpointer().restore(dir / "params")` reads it. Stacked
  `[layers, ...]` arrays are stored in chunks of one layer, the embedding and lm_head in ~64 MB
  chunks, so either can be read (and exported) a block at a time.

Memory stays bounded (about 2.5 GB for the 8B model, whatever its size): safetensors files are
read with `preadv` at the offsets of their header (not mmap-ed: pages of a mapped file count in the
resident set until unmapped, so a 4 GB shard would show 4 GB), a block of whole chunks at a time
(linear weights a slab of rows at a time, transposed into the block), and a custom Orbax type
handler writes every array block by block, all arrays at once, under one byte budget for the blocks
in flight (each also holds TensorStore's encoded copy until its commit: about 2x the budget). The
blocks' reads and transposes run in threads while earlier blocks are written; OCDBT flushes each
large chunk to its own data file, so the (fsync-ed) file writes run in parallel too. Outputs go to
a temporary folder beside the target and are renamed into place when complete.

Modules: `common` (file names, folder checks), `safetensors_io` (reading and writing safetensors
files), `hf_mapping` (HF tensor names <-> our tree), `hf` (an HF folder), `orbax_io` (our Orbax
folder), `convert` (HF <-> Orbax, streamed), `load` (either format into a mesh), `peft` (PEFT
LoRA adapter folders, read and written).
"""

from jais2_jax.checkpoint.common import (
                                         INDEX_FILE,
                                         PARAMS_DIR,
                                         SINGLE_FILE,
                                         TOKENIZER_FILES,
                                         parse_size,
                                         return_freed_memory_to_os,
)
from jais2_jax.checkpoint.convert import convert_hf_to_orbax, export_orbax_to_hf
from jais2_jax.checkpoint.hf import HFCheckpoint
from jais2_jax.checkpoint.load import is_orbax_folder, load_checkpoint
from jais2_jax.checkpoint.orbax_io import OrbaxCheckpoint, save_model
from jais2_jax.checkpoint.peft import (
                                       AdapterConfig,
                                       merge_adapter,
                                       read_adapter,
                                       read_adapter_config,
                                       save_adapter,
)

__all__ = ["INDEX_FILE", "PARAMS_DIR", "SINGLE_FILE", "TOKENIZER_FILES", "AdapterConfig",
           "HFCheckpoint", "OrbaxCheckpoint", "convert_hf_to_orbax", "export_orbax_to_hf",
           "is_orbax_folder", "load_checkpoint", "merge_adapter", "parse_size", "read_adapter",
           "read_adapter_config", "return_freed_memory_to_os", "save_adapter", "save_model"]
