"""`python -m clip_pacl.index build ARGS` / `torchrun ... -m clip_pacl.index build ARGS`: the `clip-pacl index`
commands as a module, so torchrun can launch a sharded build (`retrieval/sharded.py`). The library is in
`clip_pacl.retrieval`."""
