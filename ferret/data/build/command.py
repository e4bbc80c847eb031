"""``ferret data build`` / ``python -m ferret.data.build``: the command line of the builder."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Sequence

from ferret.data.build.common import BuildError, BuildOptions, parse_refer_forms
from ferret.data.build.context import TASK_TAGS, BuildContext

logger = logging.getLogger("ferret.data.build")

EPILOG = """\
examples:
  ferret data build --out grit --vg-dir data/vg --vg-images data/vg/images \\
      --refcoco-refs data/refcoco/refs\\(unc\\).p data/refcocog/refs\\(umd\\).p --refcoco-images data/coco/train2014 \\
      --flickr-dir data/flickr30k_entities --flickr-images data/flickr30k-images \\
      --exclude-eval data/pope/coco_pope_random.jsonl
  python -m ferret.data.validate $(cat grit/validate.args)
  python -m ferret.train.train --config grit/train_mix.json --model_name_or_path ... --output_dir ...

Evaluation images (RefCOCO/+/g val/testA/testB/test of every refs pickle given, Flickr30k val/test, and the files
given with --exclude-eval) are left out unless --keep-eval-images; the report says how many and why."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferret data build", description=(
        "Build GRIT-format training data (Ferret's instruction set) from the public annotation files: sharded "
        "JSON files named for the loaders, the recipe's mixing weights beside them, and a report."),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder: data/ (rewritten by every build), train_mix.json, "
                   "train_mix.args, validate.args, build_report.json/.txt")
    g = p.add_argument_group("sources (give any subset; each with its image folder)")
    g.add_argument("--coco-instances", nargs="+", default=[], help="COCO instances_{train2014,train2017}.json")
    g.add_argument("--coco-images", help="folder the COCO file_names are relative to (e.g. coco/train2017)")
    g.add_argument("--refcoco-refs", nargs="+", default=[],
                   help="refs(unc|google|umd).p pickles; instances.json is read from the same folder")
    g.add_argument("--refcoco-instances", nargs="+", default=None,
                   help="instances.json per refs pickle (one for all, or one each; default: beside the pickle)")
    g.add_argument("--mdetr-refexp", nargs="+", default=[],
                   help="MDETR COCO-style expression files for training (final_refexp_*/finetune_refcoco*_train)")
    g.add_argument("--refcoco-images", help="COCO train2014 folder (RefCOCO/+/g and MDETR file names)")
    g.add_argument("--flickr-dir", help="Flickr30k Entities folder (Annotations/, Sentences/, val.txt, test.txt)")
    g.add_argument("--flickr-images", help="folder of the Flickr30k <id>.jpg images")
    g.add_argument("--vg-dir", help="Visual Genome folder (image_data, objects, attributes, relationships, "
                   "region_descriptions .json)")
    g.add_argument("--vg-images", help="folder holding VG_100K/ and VG_100K_2/")
    g.add_argument("--objects365", nargs="+", default=[], help="Objects365 COCO-style annotation file(s)")
    g.add_argument("--objects365-images", help="folder the Objects365 file_names are relative to")
    g.add_argument("--lvis", nargs="+", default=[], help="LVIS COCO-style annotation file(s)")
    g.add_argument("--lvis-images", help="COCO folder holding train2017/ and val2017/ (LVIS coco_url paths)")
    e = p.add_argument_group("evaluation images")
    e.add_argument("--exclude-eval", nargs="+", default=[],
                   help="more evaluation annotation files whose images are left out: refs .p, MDETR val/test .json, "
                   "Flickr split .txt, POPE / LVIS-referring / Ferret-Bench question .jsonl")
    e.add_argument("--keep-eval-images", action="store_true", help="do not leave evaluation images out")
    b = p.add_argument_group("records")
    b.add_argument("--tasks", nargs="+", choices=sorted(TASK_TAGS), default=None,
                   help="task kinds to build (default: all the sources allow)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--refer-forms", default="point=1,box=1,free_form=1", type=_refer_forms,
                   help="weights of the referring forms of human turns (default: %(default)s)")
    b.add_argument("--negative-share", type=float, default=0.2,
                   help="share of questions about absent things per image and kind (default: %(default)s)")
    b.add_argument("--yesno-negative-share", type=float, default=0.5,
                   help="share of 'no' answers in vg_yesno_object (default: %(default)s)")
    b.add_argument("--qa-per-record", type=int, default=6, help="question/answer pairs packed per record")
    b.add_argument("--records-per-image", type=int, default=0, help="cap per image and kind (0: no cap)")
    b.add_argument("--max-instances", type=int, default=8, help="skip grounding answers with more boxes")
    b.add_argument("--canonical", action="store_true",
                   help="first template of every list and annotation order (for reading the output)")
    o = p.add_argument_group("output and run")
    o.add_argument("--merge-mix", nargs="+", default=[], metavar="DIR",
                   help="add the shards of other builds (e.g. a generate-conversations --out folder, through its "
                   "train_mix.json) to this build's training mix and validate.args")
    o.add_argument("--shard-size", type=int, default=20000, help="records per output file")
    o.add_argument("--max-images", type=int, default=0, help="use at most this many images per source (0: all)")
    o.add_argument("--skip-image-check", action="store_true",
                   help="do not check that image files exist (the validator will)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _refer_forms(text: str) -> dict[str, float]:
    try:
        return parse_refer_forms(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _need(args, flag: str, value) -> None:
    if not value:
        raise BuildError(f"{flag} is required with the source that uses it")


def read_mix(folder: str) -> list[dict]:
    """The shards listed in ``folder/train_mix.json`` as report outputs."""
    import json

    path = os.path.join(folder, "train_mix.json")
    try:
        with open(path) as f:
            mix = json.load(f)
        rows = list(zip(mix["data_path"], mix["image_folder"], mix["data_multiple"], strict=True))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BuildError(f"--merge-mix {folder}: {path} is not a readable training mix ({err})") from err
    return [{"path": p, "kind": "merged", "tag": os.path.basename(p).split("_0")[0], "source": folder,
             "image_folder": f, "records": None, "data_multiple": float(m)} for p, f, m in rows]


def run(args: argparse.Namespace) -> dict:
    """Builds everything the arguments name; returns the report dict."""
    from ferret.data.build import coco, flickr, refcoco, vg
    from ferret.data.build.leaks import load_refs

    options = BuildOptions(seed=args.seed, refer_forms=args.refer_forms, negative_share=args.negative_share,
                           yesno_negative_share=args.yesno_negative_share, qa_per_record=args.qa_per_record,
                           records_per_image=args.records_per_image, max_instances=args.max_instances,
                           canonical=args.canonical)
    merged = [read_mix(folder) for folder in args.merge_mix]  # fail early, before any work
    ctx = BuildContext(args.out, options, tasks=set(args.tasks or TASK_TAGS), shard_size=args.shard_size,
                       check_images=not args.skip_image_check, show_progress=not args.no_progress,
                       max_images=args.max_images, keep_eval_images=args.keep_eval_images)
    if not any([args.coco_instances, args.refcoco_refs, args.mdetr_refexp, args.flickr_dir, args.vg_dir,
                args.objects365, args.lvis]):
        raise BuildError("no source given: pass at least one of --coco-instances, --refcoco-refs, --mdetr-refexp, "
                         "--flickr-dir, --vg-dir, --objects365, --lvis")
    # Evaluation ids first: every source is filtered by them.
    refs = {}
    for path in args.refcoco_refs:
        refs[path] = load_refs(path)
        ctx.eval_images.add_refs(path, refs[path])
    if args.flickr_dir:
        for split in ("val.txt", "test.txt"):
            path = os.path.join(args.flickr_dir, split)
            if os.path.isfile(path):
                ctx.eval_images.add_flickr_list(path)
            else:
                logger.warning("%s not found: Flickr30k %s images cannot be left out", path, split[:-4])
    for path in args.exclude_eval:
        ctx.eval_images.add_file(path, show=ctx.show_progress)

    try:
        for path in args.coco_instances:
            _need(args, "--coco-images", args.coco_images)
            coco.build(ctx, "coco", path, args.coco_images)
        if args.refcoco_refs or args.mdetr_refexp:
            _need(args, "--refcoco-images", args.refcoco_images)
        instances = args.refcoco_instances or [None]
        if len(instances) not in (1, len(args.refcoco_refs)):
            raise BuildError(f"--refcoco-instances: give one file or one per refs pickle ({len(args.refcoco_refs)})")
        for k, path in enumerate(args.refcoco_refs):
            refcoco.build_refs(ctx, path, instances[k if len(instances) > 1 else 0], args.refcoco_images, refs[path])
        for path in args.mdetr_refexp:
            refcoco.build_mdetr(ctx, path, args.refcoco_images)
        if args.flickr_dir:
            _need(args, "--flickr-images", args.flickr_images)
            flickr.build(ctx, args.flickr_dir, args.flickr_images)
        if args.vg_dir:
            _need(args, "--vg-images", args.vg_images)
            vg.build(ctx, args.vg_dir, args.vg_images)
        for path in args.objects365:
            _need(args, "--objects365-images", args.objects365_images)
            coco.build(ctx, "objects365", path, args.objects365_images)
        for path in args.lvis:
            _need(args, "--lvis-images", args.lvis_images)
            coco.build(ctx, "lvis", path, args.lvis_images)
    finally:
        for outputs in merged:
            ctx.extra_outputs.extend(outputs)
        report = ctx.finish()
        shutil.rmtree(ctx.tmp_dir, ignore_errors=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parser().parse_args(argv)
    try:
        run(args)
    except (BuildError, ValueError) as err:  # ValueError: options out of range (BuildOptions names them)
        print(f"ferret data build: error: {err}", file=sys.stderr)
        return 2
    with open(os.path.join(args.out, "build_report.txt")) as f:
        print(f.read(), end="")
    print(f"report: {os.path.join(args.out, 'build_report.json')}; training mix: "
          f"{os.path.join(args.out, 'train_mix.json')}")
    return 0
