"""Hugging Face LlamaForCausalLM directory -> k2jax Orbax weights directory, streaming.

Tensors go to disk in their Hugging Face byte order (orbax_writer.py stores each leaf with a
zarr3 transpose codec), so the bytes read are the bytes written: no CPU transpose. Reading
tensor i+1 overlaps TensorStore's asynchronous write of tensor i (a double buffer).

Peak memory: two read buffers of the largest tensor (the one being read, the one being
written), TensorStore's encoded chunks of the one tensor being written, plus two cast buffers
only when the stored dtype differs from the source's, whatever the model size.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from k2jax import dtypes
from k2jax.checkpoint.params_io import MODEL_CONFIG_FILE
from k2jax.convert import output_dir
from k2jax.convert.buffers import ReusableBuffer, copy_into
from k2jax.convert.expected import check_tensors, expected_tensors
from k2jax.convert.hf_reader import HFCheckpoint, iter_tensors, open_hf_checkpoint
from k2jax.convert.orbax_writer import StreamingParamsWriter
from k2jax.convert.progress import Progress
from k2jax.progress import ProgressArg
from k2jax.hf.config_json import model_config_from_hf


def default_dtype(checkpoint: HFCheckpoint, names) -> str:
    """bf16 if every tensor is bf16, else fp32 (exact for fp16 and mixed sources)."""
    codes = {checkpoint.tensors[name].dtype for name in names}
    return (dtypes.BFLOAT16 if codes == {dtypes.BFLOAT16.safetensors} else dtypes.FLOAT32).short


def convert_hf_to_orbax(hf_dir: str, out_dir: str, dtype: Optional[str] = None,
                        force: bool = False, progress: ProgressArg = True):
    """Check everything, then write `out_dir` (atomically). Returns the output path.

    dtype: the stored weights' dtype, either spelling ("bf16" or "bfloat16"); None keeps bf16
    sources in bf16 and stores anything else in fp32.
    """
    out_path = output_dir.check(out_dir, force, inputs=(hf_dir,))
    checkpoint = open_hf_checkpoint(hf_dir)
    where = f"{str(hf_dir).rstrip('/')}/config.json"
    config = model_config_from_hf(checkpoint.config, where)
    check_tensors(checkpoint.tensors.values(), config, where)

    expected = expected_tensors(config)
    out_dtype = dtypes.parse(dtype or default_dtype(checkpoint, expected), "dtype").numpy
    infos = [checkpoint.tensors[name] for name in expected]
    largest = max(info.nbytes for info in infos) if checkpoint.format == "safetensors" else 0
    # Two of each: tensor i is still being written from one while tensor i+1 fills the other.
    read_buffers = [np.empty(largest, np.uint8) for _ in range(2)]
    cast_buffers = [ReusableBuffer(), ReusableBuffer()]  # allocated only if a cast is needed

    # writer.close() writes k2jax_model.json last: on gs:// it marks the directory complete
    with output_dir.output_dir(out_dir, force, MODEL_CONFIG_FILE) as staging, Progress(
            "hf-to-orbax", sum(i.nbytes for i in infos), len(infos), progress) as bar:
        writer = StreamingParamsWriter(staging, config, out_dtype)
        in_flight = InFlight(bar.update)
        try:
            tensors = iter_tensors(checkpoint, set(expected), read_buffers)
            for turn, (info, array) in enumerate(tensors):
                entry = expected[info.name]
                if array.dtype != out_dtype or not array.flags.c_contiguous:
                    array = copy_into(array, cast_buffers[turn % 2].view(array.shape, out_dtype))
                # Tensor i+1 was read while tensor i was written; wait for that write before
                # starting this one, so TensorStore holds one tensor's chunks at a time.
                in_flight.drain()
                in_flight.push(writer.write(entry.mapping, entry.layer, array), info.nbytes)
        except BaseException:
            in_flight.drain(quiet=True)  # no write may outlive the staging directory
            raise
        in_flight.drain()
        writer.close()
    return out_path


class InFlight:
    """The one write in progress, and its byte count for the progress bar once committed."""

    def __init__(self, on_done):
        self._pending = None
        self._on_done = on_done

    def push(self, future, nbytes: int) -> None:
        assert self._pending is None, "drain() first"
        self._pending = (future, nbytes)

    def drain(self, quiet: bool = False) -> None:
        """Wait for the pending write; `quiet` (on the way out of an error) swallows its own
        error so the first one is the one reported."""
        if self._pending is None:
            return
        future, nbytes = self._pending
        self._pending = None
        try:
            future.result()
        except Exception:
            if not quiet:
                raise
            return
        self._on_done(nbytes)
