"""Evaluations that print a number: `eval.zeroshot` (accuracy), `eval.retrieval` (recall@k),
`eval.segmentation` (mIoU). They encode through `clip_pacl.encode`, as zero-shot, the index and the server do.

Nothing is imported here: importing one evaluation should not load the others.
"""
