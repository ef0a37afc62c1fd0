"""k2jax Orbax weights (or a training checkpoint step directory) -> Hugging Face
LlamaForCausalLM directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

Slices are read straight into the Hugging Face layout (orbax_reader.start_read_hf; for the
converter's own layout the stored bytes are already in HF order), and reading slice i+1
overlaps writing slice i to its safetensors shard (a double buffer).

Peak memory: two read buffers of the largest tensor as stored, plus one cast buffer when the
export dtype differs from the stored one.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from k2jax import dtypes
from k2jax.convert import output_dir
from k2jax.convert.buffers import ReusableBuffer, copy_into
from k2jax.convert.expected import expected_tensors
from k2jax.convert.hf_writer import (ShardEntry, copy_files, generation_config, parse_size,
                                     write_json, write_safetensors_shards)
from k2jax.convert.orbax_reader import OrbaxParamsReader
from k2jax.convert.progress import Progress
from k2jax.tokenizer import tokenizer_files
from k2jax.progress import ProgressArg
from k2jax.errors import UserError, one_line
from k2jax.hf.config_json import hf_config_dict
from k2jax.storage_errors import storage_failure


def convert_orbax_to_hf(checkpoint_dir: str, out_dir: str, dtype: str = "bf16",
                        shard_size: str = "5GB", tokenizer: Optional[str] = None,
                        force: bool = False, progress: ProgressArg = True):
    """Check everything, then write `out_dir` (atomically). Returns the output path."""
    out_path = output_dir.check(out_dir, force, inputs=(checkpoint_dir,))
    shard_bytes = parse_size(shard_size)
    tokenizer_paths = tokenizer_files(tokenizer) if tokenizer else []
    reader = OrbaxParamsReader(checkpoint_dir)
    reader.check()
    config = reader.config
    out_dtype = dtypes.parse(dtype, "dtype").numpy
    expected = expected_tensors(config)
    entries = [ShardEntry(name, e.hf_shape, out_dtype) for name, e in expected.items()]
    items = list(expected.items())
    # Two read buffers: slice i+1 is read into one while slice i, in the other, is written.
    read_buffers = [np.empty(reader.largest_nbytes, np.uint8) for _ in range(2)]
    cast_buffer = ReusableBuffer()

    def start(i):
        _, entry = items[i]
        return reader.start_read_hf(entry.mapping, entry.layer, read_buffers[i % 2])

    def arrays():
        pending = start(0)
        for i, (name, _) in enumerate(items):
            future, stored = pending
            try:
                future.result()
            except Exception as err:  # a truncated or missing chunk file of the checkpoint
                if storage_failure(err):
                    raise
                raise UserError(f"tensor {name}: cannot be read from {reader.directory} "
                                f"({one_line(err)})") from err
            # The caller has finished with slice i-1, whose buffer now takes slice i+1.
            pending = start(i + 1) if i + 1 < len(items) else None
            view = stored
            if view.dtype != out_dtype:
                view = copy_into(stored, cast_buffer.view(stored.shape, out_dtype))
            if out_dtype == dtypes.FLOAT16.numpy and not np.isfinite(view).all() \
                    and np.isfinite(stored).all():
                raise UserError(f"tensor {name}: values exceed the float16 range; export with "
                                "dtype bf16 or fp32")
            yield name, view

    hf_config = hf_config_dict(config, torch_dtype=dtypes.from_numpy(out_dtype).name)
    # config.json last: on gs:// it marks the directory complete (convert/output_dir.py)
    with output_dir.output_dir(out_dir, force, "config.json") as staging, Progress(
            "orbax-to-hf", sum(e.nbytes for e in entries), len(entries), progress) as bar:
        write_safetensors_shards(staging, entries, shard_bytes, arrays(), bar.update)
        write_json(staging / "generation_config.json", generation_config(hf_config))
        copy_files(tokenizer_paths, staging)
        write_json(staging / "config.json", hf_config)
    return out_path
