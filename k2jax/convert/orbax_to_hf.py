"""k2jax Orbax weights (or a training checkpoint step directory) -> Hugging Face
LlamaForCausalLM directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

Peak memory: one layer slice as read, plus one re-layout buffer of the largest tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from k2jax.convert import dtypes
from k2jax.convert.atomic import atomic_output_dir, check_output
from k2jax.convert.buffers import ReusableBuffer, copy_into
from k2jax.convert.expected import expected_tensors
from k2jax.convert.hf_writer import (ShardEntry, copy_files, generation_config, tokenizer_files,
                                     write_json, write_safetensors_shards)
from k2jax.convert.orbax_reader import OrbaxParamsReader
from k2jax.convert.progress import Progress
from k2jax.errors import UserError
from k2jax.hf import name_map


def convert_orbax_to_hf(checkpoint_dir: str, out_dir: str, dtype: str = "bf16",
                        shard_size: str = "5GB", tokenizer: Optional[str] = None,
                        force: bool = False, progress: bool = True) -> Path:
    """Check everything, then write `out_dir` (atomically). Returns the output path."""
    out_path = check_output(out_dir, force, inputs=(checkpoint_dir,))
    shard_bytes = dtypes.parse_size(shard_size)
    tokenizer_paths = tokenizer_files(tokenizer) if tokenizer else []
    reader = OrbaxParamsReader(checkpoint_dir)
    reader.check()
    config = reader.config
    out_dtype = dtypes.CLI_TO_NUMPY[dtype]
    expected = expected_tensors(config)
    entries = [ShardEntry(name, e.hf_shape, out_dtype) for name, e in expected.items()]
    layout_buffer = ReusableBuffer()

    def arrays():
        for name, entry in expected.items():
            stored = reader.read(entry.mapping, entry.layer)
            view = name_map.k2jax_to_hf(stored, entry.mapping, config)
            if not (view.flags.c_contiguous and view.dtype == out_dtype):
                view = copy_into(view, layout_buffer.view(view.shape, out_dtype))
            if out_dtype == dtypes.CLI_TO_NUMPY["fp16"] and not np.isfinite(view).all() \
                    and np.isfinite(stored).all():
                raise UserError(f"tensor {name}: values exceed the float16 range; export with "
                                "--dtype bf16 or fp32")
            yield name, view

    hf_config = name_map.hf_config_dict(config, torch_dtype=dtypes.NUMPY_TO_NAME[out_dtype])
    with atomic_output_dir(out_path, force) as staging, Progress(
            "orbax-to-hf", sum(e.nbytes for e in entries), len(entries), progress) as bar:
        write_safetensors_shards(staging, entries, shard_bytes, arrays(), bar.update)
        write_json(staging / "config.json", hf_config)
        write_json(staging / "generation_config.json", generation_config(hf_config))
        copy_files(tokenizer_paths, staging)
    return out_path
