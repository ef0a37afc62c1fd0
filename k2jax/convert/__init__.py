"""Streaming weight conversion between Hugging Face LlamaForCausalLM directories and k2jax
Orbax weights directories (docs/conversion.md).

At most two tensors (one layer slice each: the one being written, the next being read) are in
memory at a time, so a 65B model converts on an ordinary host; the output is staged in a hidden
sibling directory and renamed when complete (k2jax/atomic_write.py). Modules:
  hf_reader.py     HF directory (safetensors or .bin, sharded or single) -> tensor infos, arrays
  expected.py      what the model config expects, checked before anything is written
  orbax_writer.py  stacked-layer Orbax weights directory (zarr3, chunks in HF byte order),
                   written layer slice by layer slice
  orbax_reader.py  weights or training-checkpoint directory -> one layer slice at a time
  hf_writer.py     safetensors shards streamed to disk (--shard-size), index, config,
                   generation config
  hf_to_orbax.py / orbax_to_hf.py   the two directions
Dtype names come from k2jax/dtypes.py; tensor and config.json layouts from k2jax/hf/.
"""
