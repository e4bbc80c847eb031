"""Benchmarks for Ferret: one module per benchmark, shared metrics and file handling.

* ``metrics``      box IoU (DETR-style, continuous), the mean box, Acc@IoU, Recall@k.
* ``common``       prediction files and folders (chunk files merged in numeric order), alignment of predictions
                   to ground truth by key, where metric files go, and turning a model answer into boxes.
* ``refexp``       RefCOCO / RefCOCO+ / RefCOCOg referring expression comprehension (Acc@0.5).
* ``flickr``       Flickr30k Entities phrase grounding (Recall@1/5/10 and upper bound at IoU 0.5).
* ``lvis``         LVIS referring object classification (two-way choice, accuracy per region type).
* ``pope``         POPE object hallucination (accuracy, precision, recall, F1, yes-ratio).
* ``ferret_bench`` Ferret-Bench, judged by a GPT-style model through any OpenAI-compatible endpoint.

Each benchmark module has a ``score_*`` function (pure: records in, metrics out) and a ``main()`` command line,
for example ``python -m ferret.eval.refexp score --predictions DIR --annotation-file FILE``.

This package stays light to import: nothing here loads torch or the model.
"""
