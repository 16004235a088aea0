"""Evaluations that print a number: `eval.zeroshot` (accuracy), `eval.retrieval` (recall@k),
`eval.segmentation` (mIoU); `eval.common` holds the batched encoding they share.

Nothing is imported here: `zeroshot` and `retrieval` build on `eval.common`, and importing one
evaluation should not load the others.
"""
