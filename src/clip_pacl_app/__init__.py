"""clip-pacl's applications: the `clip-pacl` command (`cli/`), its web server (`web/`) and the demo (`demo/`).

The library is `clip_pacl` (models, weights, data, training, the tasks); everything here parses, serves or
walks through, and calls it. The library never imports this package (tests/test_imports.py), so
`import clip_pacl` in a user's script loads no CLI, web framework or demo code. Nothing is imported here:
`clip-pacl --help` starts without torch.
"""
