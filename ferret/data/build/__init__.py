"""Build GRIT-format training data from public annotations (``ferret data build``).

Sources: COCO instances, RefCOCO/+/g (refs pickles or MDETR files), Flickr30k Entities, Visual Genome, Objects365
and LVIS; one module reads each (coco.py also serves LVIS and Objects365). ``templates`` holds the questions
and answers per task kind, ``negatives`` the absent-object mining, ``leaks`` the evaluation images kept out,
``streaming`` the bounded-memory reading, ``writer`` the shards, mix and report, ``conversations`` the
GPT-generated dialogues (``ferret data generate-conversations``).
"""


def main(argv=None) -> int:
    from ferret.data.build.command import main as command_main

    return command_main(argv)
