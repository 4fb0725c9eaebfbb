"""Every mistake a user can make: one line on stderr, exit code 2, no traceback (issue 7).

The table runs each case as a separate process: forked children running ``sslbench.commands.cli.main``
(tests/_reliability.py; no import cost), and a few of them again through ``python -m sslbench``
(the real entry point, import-time warnings included). Cases that need data use a 64-image folder
at 16 px; the ones that need a run directory share one 2-step run.
"""

from __future__ import annotations

import builtins
import errno
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from _faults import fail_writes
from _reliability import TINY, child_env, lines, make_image_folder, run_forked, run_many, run_subprocess
from PIL import Image

from sslbench.core.runlock import RunLock

# --------------------------------------------------------------------------------------------
# The table: id -> (argv with {placeholders}, key phrases the one stderr line must contain)

CASES: dict[str, tuple[list[str], list[str]]] = {
    # names, with suggestions
    "unknown-method": (["train", "--method", "simclrr"], ["unknown method 'simclrr'", "did you mean 'simclr'"]),
    "unknown-backbone": (["train", "--backbone", "resnet181"], ["unknown backbone 'resnet181'", "'resnet18'"]),
    "unknown-data": (["train", "--data", "cifar11"], ["unknown data set 'cifar11'", "'cifar10'"]),
    "unknown-key": (["train", "--set", "temprature=0.1"], ["unknown config key 'temprature'", "temperature"]),
    "unknown-aug-key": (["train", "--set", "aug.crop_scal=0.5,1"], ["unknown config key 'aug.crop_scal'", "aug.crop_scale"]),
    "unknown-section": (["train", "--set", "foo.bar=1"], ["unknown config section 'foo'"]),
    "unknown-flag": (["train", "--bogus"], ["unrecognized arguments: --bogus"]),
    "unknown-list": (["list", "widgets"], ["invalid choice: 'widgets'"]),
    # types
    "batch-size-abc": (["train", "--batch-size", "abc"], ["--batch-size", "invalid int value: 'abc'"]),
    "set-lr-abc": (["train", "--set", "lr=abc"], ["lr expects float, got 'abc'"]),
    "set-no-equals": (["train", "--set", "lr"], ["--set expects key=value"]),
    "epochs-and-steps": (["train", "--epochs", "1", "--steps", "2"], ["not allowed with argument"]),
    # ranges and choices
    "negative-lr": (["train", "--lr", "-0.1"], ["lr must be > 0"]),
    "temperature-zero": (["train", "--set", "temperature=0"], ["temperature must be > 0"]),
    "steps-zero": (["train", "--steps", "0"], ["steps must be > 0"]),
    "batch-size-zero": (["train", "--batch-size", "0"], ["batch_size must be > 0"]),
    "precision-fp8": (["train", "--precision", "fp8"], ["precision must be one of", "'fp8'"]),
    "optimizer-adam": (["train", "--optimizer", "adam"], ["optimizer must be one of", "adamw", "'adam'"]),
    "crop-scale-reversed": (["train", "--set", "aug.crop_scale=0.5,0.1"], ["aug.crop_scale must satisfy"]),
    "flip-probability": (["train", "--set", "aug.flip_p=1.5"], ["aug.flip_p is a probability"]),
    "nonfinite-choice": (["train", "--set", "nonfinite=ignore"], ["nonfinite must be one of"]),
    "keep-zero": (["train", "--set", "keep_checkpoints=0"], ["keep_checkpoints must be >= 1"]),
    "vit-image-size-4": (["train", "--backbone", "vit_tiny_patch16_224", "--image-size", "4"], ["image_size 4 is too small"]),
    "resnet-1px": (["train", "--image-size", "1"], ["image_size 1 is too small"]),
    "batch-size-1-simclr": (
        ["train", "--data", "imagefolder:{data}", *TINY, "--batch-size", "1", "--output", "{tmp}/b1"],
        ["batch size 1 is too small for simclr"],
    ),
    "image-below-stride": (
        [
            "train",
            "--data",
            "imagefolder:{data}",
            "--backbone",
            "efficientnet_b0",
            "--image-size",
            "16",
            "--batch-size",
            "16",
            "--output",
            "{tmp}/eff",
        ],
        ["too small for efficientnet_b0", "downsamples by 32"],
    ),
    "backbone-bad-kwarg": (
        ["train", "--data", "imagefolder:{data}", *TINY, "--set", "backbone_kwargs.bogus_kw=1", "--output", "{tmp}/kw"],
        ["rejected backbone_kwargs", "bogus_kw"],
    ),
    "backbone-kwarg-breaks-forward": (
        ["train", "--data", "imagefolder:{data}", *TINY, "--set", "backbone_kwargs.in_chans=1", "--output", "{tmp}/kw1"],
        ["forward pass fails", "check backbone_kwargs"],
    ),
    "backbone-kwarg-bad-value": (
        ["train", "--data", "imagefolder:{data}", *TINY, "--set", "backbone_kwargs.drop_rate=abc", "--output", "{tmp}/kw2"],
        ["forward pass fails", "'abc'"],
    ),
    # found by an audit (2026-11-23): each was a traceback, a wrong message or a silent change
    "set-a-whole-section": (["train", "--set", "aug=1"], ["aug is a section", "--set aug.KEY=VALUE"]),
    "set-infinite-int": (["train", "--set", "batch_size=1e400"], ["batch_size expects a finite int"]),
    "seed-negative": (["train", "--seed", "-1"], ["seed must be in 0..4294967295"]),
    "seed-too-large": (["train", "--set", "seed=4294967296"], ["seed must be in 0..4294967295"]),
    "sgd-momentum-negative": (["train", "--set", "sgd_momentum=-1"], ["sgd_momentum must be in [0, 1)"]),
    "num-workers-negative": (["train", "--set", "num_workers=-1"], ["num_workers and max_skipped_steps must be >= 0"]),
    "config-section-not-mapping": (["train", "--config", "{section_yaml}"], ["method_cfg in the config file must be a mapping", "5"]),
    "config-number-key": (["train", "--config", "{intkey_yaml}"], ["intkey.yaml", "unknown config key '1'"]),
    "config-not-utf8": (["train", "--config", "{binary_yaml}"], ["is not UTF-8 text"]),
    "config-a-directory": (["train", "--config", "{tmp}"], ["is a directory"]),
    "resume-other-method": (["train", "--resume", "--output", "{run}", "--method", "byol"], ["was trained with simclr", "cannot change method"]),
    "resume-before-the-checkpoint": (
        ["train", "--resume", "--output", "{run_busy}", "--steps", "1"],
        ["newest checkpoint is at step 2, beyond this run's 1 steps", "--steps 2"],
    ),
    "compare-owns-seed": (
        ["compare", "--methods", "simclr", "--steps", "1", "--set", "seed=5", "--output", "{tmp}/cmp"],
        ["--set seed=... is set by compare itself", "--seeds"],
    ),
    "eval-device-bogus": (["eval", "{run}", "--device", "foo"], ["--device 'foo' is not a device"]),
    "eval-a-file": (["eval", "{file}"], ["is a file; pass a run directory"]),
    "eval-results-into-config": (["eval", "{run}", "--results", "{run}/config.yaml"], ["must be a .jsonl file"]),
    "leaderboard-over-its-input": (["leaderboard", "{results}", "--output", "{results}"], ["would overwrite a results store"]),
    "leaderboard-no-rows": (["leaderboard", "{garbage_jsonl}"], ["holds no result rows"]),
    "leaderboard-plot-suffix": (["leaderboard", "{results}", "--plot", "{tmp}/board.txt"], ["name the image with one of the suffixes", "png"]),
    # data
    "data-missing": (["train", "--data", "imagefolder:/nonexistent/images", "--output", "{tmp}/nodata"], ["/nonexistent/images does not exist"]),
    "data-no-images": (["train", "--data", "imagefolder:{empty}", "--output", "{tmp}/empty"], ["has no images"]),
    "data-no-test-split": (["train", "--data", "imagefolder:{trainonly}", "--output", "{tmp}/trainonly"], ["has no test (or val) folder"]),
    "data-all-corrupt": (["train", "--data", "imagefolder:{corrupt}", *TINY, "--output", "{tmp}/corrupt"], ["no readable image in"]),
    "data-spec-no-path": (["train", "--data", "imagefolder:"], ["needs a path"]),
    # files and directories
    "output-under-a-file": (
        ["train", "--data", "imagefolder:{data}", "--output", "{file}/run"],
        ["cannot write to output directory", "Not a directory"],
    ),
    "output-holds-a-run": (["train", "--data", "imagefolder:{data}", *TINY, "--output", "{run_busy}"], ["already holds a run", "--resume"]),
    "resume-without-output": (["train", "--resume"], ["--resume needs --output"]),
    "resume-not-a-run": (["train", "--resume", "--output", "{tmp}"], ["has no config.yaml"]),
    "resume-other-backbone": (
        ["train", "--resume", "--output", "{run_other_backbone}", "--quiet"],
        ["was made for a different model", "shape mismatches"],
    ),
    "config-missing": (["train", "--config", "{tmp}/missing.yaml"], ["missing.yaml not found"]),
    "config-malformed": (["train", "--config", "{bad_yaml}"], ["is not valid YAML"]),
    "config-not-a-mapping": (["train", "--config", "{list_yaml}"], ["must hold a mapping"]),
    "config-unknown-key": (["train", "--config", "{typo_yaml}"], ["config file", "typo.yaml", "unknown config key 'lrr'", "lr"]),
    # eval
    "eval-label-fraction": (["eval", "{run}", "--protocol", "finetune", "--label-fractions", "1.5"], ["label fraction", "1.5"]),
    "eval-unknown-protocol": (["eval", "{run}", "--protocol", "knnn"], ["unknown protocol 'knnn'", "'knn'"]),
    "eval-not-a-run": (["eval", "{tmp}/nothing-here"], ["nothing-here"]),
    "eval-encoder-mismatch": (["eval", "{eval_other_backbone}", "--protocol", "knn"], ["does not match the backbone"]),
    # ---- issue 20: one writer per run directory
    "train-into-a-run-in-use": (
        ["train", "--data", "imagefolder:{data}", *TINY, "--output", "{locked_run}"],
        ["is in use by pid", "since", "running `", "pass another --output"],
    ),
    "resume-a-run-in-use": (["train", "--resume", "--output", "{locked_run}", "--quiet"], ["is in use by pid", "once that process has stopped"]),
    "compare-into-a-directory-in-use": (
        ["compare", "--methods", "simclr", "--steps", "1", "--data", "imagefolder:{data}", *TINY[:4], "--output", "{locked_cmp}"],
        ["is in use by pid", "pass another --output"],
    ),
    "eval-a-run-still-training": (["eval", "{locked_run}"], ["is still being trained by pid", "once training has finished"]),
    "export-a-run-still-training": (
        ["export", "{locked_run}", "{tmp}/exported"],
        ["is still being trained by pid", "export it once training has finished"],
    ),
    # ---- records equal what ran; settings that cannot take effect here
    "precision-fp16-on-cpu": (["train", "--precision", "fp16", "--output", "{tmp}/fp16"], ["precision fp16 needs a CUDA GPU", "--precision no"]),
    "precision-fp16-in-config": (["train", "--config", "{fp16_yaml}", "--output", "{tmp}/fp16c"], ["precision fp16 needs a CUDA GPU"]),
    "compare-precision-fp16": (
        ["compare", "--methods", "simclr", "--steps", "1", "--data", "imagefolder:{data}", "--precision", "fp16", "--output", "{tmp}/cmp16"],
        ["precision fp16 needs a CUDA GPU"],
    ),
    # ---- questionable inputs
    "warmup-longer-than-the-run": (
        ["train", "--data", "imagefolder:{data}", *TINY, "--steps", "2", "--set", "warmup_epochs=5", "--output", "{tmp}/warm"],
        ["warmup_epochs=5 is 20 steps", "never decay"],
    ),
    "subset-smaller-than-classes": (
        ["train", "--data", "imagefolder:{data}", *TINY, "--train-subset", "2", "--output", "{tmp}/sub"],
        ["--train-subset 2 is smaller than the 4 classes", "--train-subset 4"],
    ),
    "resume-other-batch-size": (["train", "--resume", "--output", "{run}", "--batch-size", "8"], ["was trained with batch_size 16", "got 8"]),
    "resume-other-seed": (["train", "--resume", "--output", "{run}", "--seed", "3"], ["was trained with seed 0", "got 3"]),
    "resume-other-image-size": (["train", "--resume", "--output", "{run}", "--image-size", "32"], ["was trained with image_size 16"]),
    "resume-other-data": (["train", "--resume", "--output", "{run}", "--data", "imagefolder:{onecls}"], ["was trained with data imagefolder:"]),
    "resume-other-batch-size-by-set": (["train", "--resume", "--output", "{run}", "--set", "batch_size=32"], ["batch_size 16", "got 32"]),
    "config-epochs-and-steps": (["train", "--config", "{both_yaml}"], ["config file", "both.yaml", "gives both epochs (2) and steps (3)"]),
    "compare-config-epochs-and-steps": (
        ["compare", "--methods", "simclr", "--steps", "1", "--config", "{both_yaml}"],
        ["both.yaml", "gives both epochs"],
    ),
    "eval-one-class-data": (["eval", "{run}", "--data", "imagefolder:{onecls}"], ["has a single class (c0)", "two or more classes"]),
    "compare-one-class-data": (
        ["compare", "--methods", "simclr", "--steps", "1", "--data", "imagefolder:{onecls}", *TINY[:4], "--output", "{tmp}/cmp1"],
        ["has a single class", "two or more classes"],
    ),
    # ---- a config file's mistakes name the file
    "config-method-key-typo": (
        ["train", "--config", "{methodkey_yaml}"],
        ["methodkey.yaml", "unknown config key 'method_cfg.temprature'", "temperature"],
    ),
    "config-wrong-type": (["train", "--config", "{badtype_yaml}"], ["badtype.yaml", "lr expects float, got 'fast'"]),
    "config-out-of-range": (["train", "--config", "{badrange_yaml}"], ["badrange.yaml", "epochs must be > 0"]),
    "config-bad-tuple": (["train", "--config", "{badtuple_yaml}"], ["badtuple.yaml", "aug.crop_scale expects 2 comma-separated numbers"]),
    "compare-config-unknown-key": (
        ["compare", "--methods", "simclr,byol", "--steps", "1", "--config", "{methodkey_yaml}"],
        ["methodkey.yaml", "unknown config key 'method_cfg.temprature'"],
    ),
    # ---- malformed tuple values: the expected form and the text as written
    "tuple-three-numbers": (
        ["train", "--set", "aug.crop_scale=0.2,0.5,0.9"],
        ["aug.crop_scale expects 2 comma-separated numbers (e.g. 0.2,1.0), got '0.2,0.5,0.9'"],
    ),
    "tuple-one-number": (["train", "--set", "betas=0.9"], ["betas expects 2 comma-separated numbers", "got '0.9'"]),
    "tuple-unclosed-bracket": (["train", "--set", "aug.crop_scale=(0.2,"], ["aug.crop_scale expects 2 comma-separated numbers", "'(0.2,'"]),
    "tuple-empty-item": (["train", "--set", "betas=0.9,,0.99"], ["betas: '0.9,,0.99' has an empty item between commas"]),
    "tuple-words": (["train", "--set", "aug.crop_scale=a,b"], ["aug.crop_scale expects 2 comma-separated numbers", "got 'a,b'"]),
    "tuple-nan": (["train", "--set", "betas=nan,0.9"], ["betas expects 2 comma-separated numbers"]),
    "backbone-kwarg-words": (
        ["train", "--data", "imagefolder:{data}", *TINY, "--set", "backbone_kwargs.channels=a,b", "--output", "{tmp}/kw3"],
        ["backbone_kwargs.channels=a,b", "is text, not numbers", "backbone_kwargs.channels=16,32,64,128"],
    ),
    "byol-given-temperature": (
        ["train", "--method", "byol", "--set", "temperature=0.1"],
        ["'temperature' is a setting of", "simclr", "not of byol", "--method"],
    ),
    "byol-config-temperature": (
        ["train", "--method", "byol", "--config", "{methodtemp_yaml}"],
        ["methodtemp.yaml", "'method_cfg.temperature' is a setting of"],
    ),
    "backbone-kwarg-empty-item": (["train", "--set", "backbone_kwargs.channels=8,,16,32"], ["backbone_kwargs.channels:", "empty item"]),
    # ---- more ranges and types
    "epochs-zero": (["train", "--epochs", "0"], ["epochs must be > 0"]),
    "steps-negative": (["train", "--steps", "-3"], ["steps must be > 0"]),
    "image-size-abc": (["train", "--image-size", "abc"], ["--image-size", "invalid int value: 'abc'"]),
    "lr-nan": (["train", "--set", "lr=nan"], ["lr expects float"]),
    "grad-clip-zero": (["train", "--set", "grad_clip=0"], ["grad_clip must be > 0"]),
    "warmup-negative": (["train", "--set", "warmup_epochs=-1"], ["warmup_epochs must be >= 0"]),
    "weight-decay-negative": (["train", "--set", "weight_decay=-0.1"], ["weight_decay must be >= 0"]),
    "weight-decay-end-negative": (["train", "--set", "weight_decay_end=-1"], ["weight_decay_end must be >= 0"]),
    "lr-scaling-choice": (["train", "--set", "lr_scaling=cube"], ["lr_scaling must be one of", "'cube'"]),
    "log-every-zero": (["train", "--set", "log_every=0"], ["log_every >= 1"]),
    "knn-k-zero": (["train", "--set", "knn_k=0"], ["knn_k must be >= 1"]),
    "knn-temperature-zero": (["train", "--set", "knn_temperature=0"], ["knn_temperature > 0"]),
    "betas-out-of-range": (["train", "--set", "betas=0.9,1.5"], ["betas must be two numbers in [0, 1)"]),
    "train-subset-zero": (["train", "--train-subset", "0"], ["train_subset must be > 0"]),
    "grad-cache-negative": (["train", "--grad-cache-chunk", "-1"], ["grad_cache_chunk must be >= 0"]),
    "lars-eta-zero": (["train", "--set", "lars_eta=0"], ["lars_eta must be > 0"]),
    "sgd-momentum-one": (["train", "--set", "sgd_momentum=1"], ["sgd_momentum must be in [0, 1)"]),
    "time-budget-zero": (["train", "--set", "time_budget_s=0"], ["time_budget_s must be > 0"]),
    "jitter-negative": (["train", "--set", "aug.jitter_strength=-1"], ["aug.jitter_strength must be >= 0"]),
    "crop-scale-zero": (["train", "--set", "aug.crop_scale=0,1"], ["aug.crop_scale must satisfy"]),
    "batch-size-fraction": (["train", "--set", "batch_size=2.5"], ["batch_size expects int, got '2.5'"]),
    "bool-not-a-bool": (["train", "--set", "channels_last=maybe"], ["channels_last expects bool, got 'maybe'"]),
    "set-method-unknown": (["train", "--set", "method=simclrr"], ["unknown method 'simclrr'"]),
    "set-section-method-cfg": (["train", "--set", "method_cfg=1"], ["method_cfg is a section"]),
    "set-empty-key": (["train", "--set", "=1"], ["unknown config key ''"]),
    "hf-unknown-option": (["train", "--data", "hf:someone/set?imgae=img"], ["unknown option 'imgae'", "image"]),
    # ---- issue 34: errors that name the real cause
    "dino-batch-1": (
        ["train", "--method", "dino", "--data", "imagefolder:{data}", *TINY, "--batch-size", "1", "--output", "{tmp}/dino1"],
        ["batch size 1 is too small for dino"],
    ),
    "one-image-folder": (
        ["train", "--data", "imagefolder:{oneimg}", *TINY, "--output", "{tmp}/oneimg"],
        ["has 1 training image", "simclr", "add images"],
    ),
    "per-process-batch-below-minimum": (  # run as rank 0 of 2 processes (BEFORE: _as_two_processes)
        ["train", "--method", "byol", "--data", "imagefolder:{data}", *TINY, "--batch-size", "2", "--set", "sync_bn=false", "--output", "{tmp}/pp"],
        ["--batch-size 2 over 2 processes is 1 image per process", "the 2 that byol needs per process with sync_bn=false", "--batch-size 4"],
    ),
    "local-crops-larger-than-global": (
        ["train", "--method", "dino", "--data", "imagefolder:{data}", *TINY, "--set", "method_cfg.local_crop_size=64", "--output", "{tmp}/lc"],
        ["method_cfg.local_crop_size 64 px is not smaller than the global views (16 px", "method_cfg.local_crops=0"],
    ),
    "swav-local-crops-as-large": (
        ["train", "--method", "swav", "--data", "imagefolder:{data}", *TINY, "--set", "local_crop_size=16", "--output", "{tmp}/lc2"],
        ["method_cfg.local_crop_size 16 px is not smaller than the global views", "method_cfg.num_local_crops=0"],
    ),
    "hf-a-builder-name": (
        ["train", "--data", "hf:parquet", "--output", "{tmp}/hfp"],
        ["hf:parquet names the datasets library's 'parquet' format", "hf:FILE"],
    ),
    "hf-image-folder-one-class": (
        ["train", "--data", "hf:{hfone}", *TINY, "--output", "{tmp}/hf1"],
        ["all in one class folder", "no label column", "a folder of its own", "imagefolder:PATH"],
    ),
    "hf-csv-missing-images": (
        ["train", "--data", "hf:{csv_missing}", *TINY, "--output", "{tmp}/hfcsv"],
        ["none of the 2 image files in column 'image' exists", "'img/a.png'", "correct the paths"],
    ),
    "data-class-folders-differ": (["train", "--data", "imagefolder:{differ}", "--output", "{tmp}/differ"], ["class folders differ"]),
    "output-is-a-file": (["train", "--data", "imagefolder:{data}", "--output", "{file}"], ["cannot write to output directory", "Not a directory"]),
    "resume-config-malformed": (["train", "--resume", "--output", "{run_bad_config}"], ["is not valid YAML"]),
    # ---- outputs checked before any work: a file on the way, a directory, permissions, a read-only disk
    "eval-results-under-a-file": (["eval", "{run}", "--results", "{file}/r.jsonl"], ["cannot write --results", "is a file, not a directory"]),
    "eval-results-a-directory": (["eval", "{run}", "--results", "{dir_jsonl}"], ["cannot write --results", "it is a directory"]),
    "eval-results-permission": (["eval", "{run}", "--results", "{noperm}/r.jsonl"], ["cannot write --results", "Permission denied"]),
    "eval-results-read-only": (["eval", "{run}", "--results", "{rofs}/r.jsonl"], ["cannot write --results", "Read-only file system"]),
    "leaderboard-output-under-a-file": (
        ["leaderboard", "{results}", "--output", "{file}/board.md"],
        ["cannot write --output", "is a file, not a directory"],
    ),
    "leaderboard-output-a-directory": (["leaderboard", "{results}", "--output", "{root}"], ["cannot write --output", "it is a directory"]),
    "leaderboard-output-read-only": (["leaderboard", "{results}", "--output", "{rofs}/board.md"], ["cannot write --output", "Read-only file system"]),
    "leaderboard-plot-under-a-file": (
        ["leaderboard", "{results}", "--plot", "{file}/board.png"],
        ["cannot write --plot", "is a file, not a directory"],
    ),
    "leaderboard-plot-permission": (["leaderboard", "{results}", "--plot", "{noperm}/board.png"], ["cannot write --plot", "Permission denied"]),
    "compare-output-under-a-file": (
        ["compare", "--methods", "simclr", "--steps", "1", "--data", "imagefolder:{data}", *TINY[:4], "--output", "{file}/cmp"],
        ["cannot write --output", "is a file, not a directory"],
    ),
    "compare-output-read-only": (
        ["compare", "--methods", "simclr", "--steps", "1", "--data", "imagefolder:{data}", *TINY[:4], "--output", "{rofs}/cmp"],
        ["cannot write --output", "Read-only file system"],
    ),
    "train-output-permission": (
        ["train", "--data", "imagefolder:{data}", *TINY, "--output", "{noperm}/run"],
        ["cannot write to output directory", "Permission denied"],
    ),
    "train-output-read-only": (
        ["train", "--data", "imagefolder:{data}", *TINY, "--output", "{rofs}/run"],
        ["cannot write to output directory", "Read-only file system"],
    ),
    "data-cache-read-only": (
        ["train", "--data", "imagefolder:{data}", *TINY, "--output", "{tmp}/rocache"],
        ["cannot write the data cache", "Read-only file system", "cache_dir"],
    ),
    # ---- offline
    "pretrained-weights-offline": (
        ["train", "--data", "imagefolder:{data}", *TINY, "--set", "backbone_kwargs.pretrained=true", "--output", "{tmp}/pre"],
        ["cannot get the pretrained weights of resnet18", "no network", "pretrained_cfg_overlay"],
    ),
    "pretrained-weights-no-dns": (
        ["train", "--data", "imagefolder:{data}", *TINY, "--set", "backbone_kwargs.pretrained=true", "--output", "{tmp}/pre2"],
        ["cannot get the pretrained weights of resnet18", "no network"],
    ),
    "hub-dataset-offline": (
        ["train", "--data", "hf:nobody/no-such-set", "--output", "{tmp}/hf"],
        ["cannot load Hugging Face dataset 'nobody/no-such-set'", "no network", "save_to_disk"],
    ),
    "callbacks-env-unknown": (["train", "--output", "{tmp}/cb"], ["$SSLBENCH_CALLBACKS: cannot import 'no_such_module:Thing'"]),
    # ---- eval
    "eval-encoder-missing": (["eval", "{run_no_encoder}"], ["encoder.safetensors not found"]),
    "eval-encoder-corrupt": (["eval", "{run_bad_encoder}"], ["is not a readable safetensors file"]),
    "eval-budget-corrupt": (["eval", "{run_bad_budget}", "--protocol", "knn"], ["is not a valid budget file"]),
    "eval-run-config-unknown-key": (["eval", "{run_bad_key}"], ["run-bad_key/config.yaml", "unknown config key 'bogus_key'", "remove"]),
    "resume-run-config-unknown-key": (
        ["train", "--resume", "--output", "{run_bad_key}"],
        ["run-bad_key/config.yaml", "unknown config key 'bogus_key'", "remove"],
    ),
    "eval-config-malformed": (["eval", "{run_bad_config}"], ["is not valid YAML"]),
    "eval-max-memory-negative": (["eval", "{run}", "--max-memory-gb", "-1"], ["--max-memory-gb must be >= 0"]),
    "eval-no-cuda": (["eval", "{run}", "--device", "cuda:3"], ["--device cuda:3: no such CUDA device here"]),
    "eval-unknown-flag": (["eval", "{run}", "--bogus"], ["unrecognized arguments: --bogus"]),
    "eval-missing-run-dir": (["eval"], ["pass a run directory to evaluate", "--encoder timm:NAME"]),
    # sslbench eval --encoder SPEC (an encoder sslbench did not train)
    "eval-encoder-and-run": (["eval", "{run}", "--encoder", "timm:resnet18"], ["pass either a run directory", "not both"]),
    "eval-encoder-no-data": (["eval", "--encoder", "timm:resnet18"], ["--encoder timm:resnet18 needs --data"]),
    "eval-encoder-bad-spec": (["eval", "--encoder", "resnet18", "--data", "imagefolder:{data}"], ["'resnet18' is not an encoder spec", "timm:NAME"]),
    "eval-encoder-unknown-timm": (
        ["eval", "--encoder", "timm:resnet181", "--data", "imagefolder:{data}"],
        ["unknown timm model 'resnet181'", "'resnet18'", "--encoder timm:resnet181"],
    ),
    "eval-encoder-weights-missing": (
        ["eval", "--encoder", "timm:resnet18", "--weights", "{tmp}/nope.pth", "--data", "imagefolder:{data}"],
        ["--weights", "nope.pth: no such file"],
    ),
    "eval-encoder-weights-mismatch": (
        ["eval", "--encoder", "timm:resnet18", "--weights", "{run}/encoder.safetensors", "--data", "imagefolder:{data}"],
        ["encoder.safetensors does not match the backbone", "shape mismatches", "of timm:resnet18"],
    ),
    "eval-encoder-weights-with-folder": (
        ["eval", "--encoder", "local-dir:{tmp}", "--weights", "{tmp}/w.pth", "--data", "imagefolder:{data}"],
        ["--weights applies to --encoder timm:NAME"],
    ),
    "eval-encoder-local-dir-missing": (
        ["eval", "--encoder", "local-dir:{tmp}/no-export", "--data", "imagefolder:{data}"],
        ["no-export is not a folder", "config.json + model.safetensors"],
    ),
    "eval-encoder-local-dir-not-timm": (
        ["eval", "--encoder", "local-dir:{run}", "--data", "imagefolder:{data}"],
        ["has no config.json", "sslbench export"],
    ),
    "eval-encoder-hf-hub-offline": (
        ["eval", "--encoder", "hf-hub:sslbench-tests/not-cached", "--data", "imagefolder:{data}"],
        ["not in the local Hugging Face cache", "hf download sslbench-tests/not-cached"],
    ),
    "eval-encoder-features-z": (
        ["eval", "--encoder", "timm:resnet18", "--data", "imagefolder:{data}", "--features", "z"],
        ["an external encoder has no projector"],
    ),
    "eval-image-size-with-run": (["eval", "{run}", "--image-size", "32"], ["--image-size: only with --encoder"]),
    # ---- compare
    "compare-unknown-method": (["compare", "--methods", "simclr,bogus", "--steps", "1"], ["unknown method 'bogus'"]),
    "compare-bad-seed": (["compare", "--methods", "simclr", "--steps", "1", "--seeds", "0,x"], ["--seeds: 'x' is not an integer"]),
    "compare-zero-steps": (["compare", "--methods", "simclr", "--steps", "0"], ["--steps must be >= 1"]),
    "compare-bad-duration": (["compare", "--methods", "simclr", "--time-budget", "10q"], ["cannot read the duration '10q'"]),
    "compare-no-budget": (
        ["compare", "--methods", "simclr"],
        ["one of the arguments --epochs --steps --images --time-budget --device-hours is required"],
    ),
    "compare-device-hours-zero": (
        ["compare", "--methods", "simclr", "--device-hours", "0"],
        ["--device-hours must be a positive number of hours, got 0"],
    ),
    "compare-owns-output": (["compare", "--methods", "simclr", "--steps", "1", "--set", "output=x"], ["--set output=... is set by compare itself"]),
    "compare-unknown-protocol": (["compare", "--methods", "simclr", "--steps", "1", "--protocol", "knnn"], ["unknown protocol 'knnn'"]),
    "compare-other-config-in-the-way": (
        ["compare", "--methods", "simclr", "--steps", "1", "--data", "imagefolder:{data}", *TINY[:4], "--output", "{cmp_other}"],
        ["holds a run with another config"],
    ),
    # ---- leaderboard and list
    "leaderboard-missing-file": (["leaderboard", "{tmp}/none.jsonl"], ["results file", "none.jsonl not found"]),
    "leaderboard-dir-without-store": (["leaderboard", "{data}"], ["results.jsonl not found"]),
    "leaderboard-format-pdf": (["leaderboard", "{results}", "--format", "pdf"], ["invalid choice: 'pdf'"]),
    "leaderboard-output-jsonl": (["leaderboard", "{results}", "--output", "{tmp}/table.jsonl"], ["would overwrite a results store"]),
    "list-nothing": (["list"], ["the following arguments are required: what"]),
    "list-extra-argument": (["list", "methods", "a", "b"], ["unrecognized arguments: b"]),
    "list-bad-flag": (["list", "datasets", "--bogus"], ["unrecognized arguments: --bogus"]),
    "unknown-command": (["frobnicate"], ["invalid choice: 'frobnicate'"]),
}

# also run through `python -m sslbench` (the real entry point and its imports)
SUBPROCESS_CASES = ("unknown-method", "batch-size-abc", "resume-other-backbone")

# Cases run with a fault of the file system (tests/_faults.py: no real read-only disk or permissions
# needed, which root would not see anyway) or with their own environment variables.
BEFORE = {
    "eval-results-permission": fail_writes("/noperm", errno.EACCES),
    "eval-results-read-only": fail_writes("/rofs", errno.EROFS),
    "leaderboard-output-read-only": fail_writes("/rofs", errno.EROFS),
    "leaderboard-plot-permission": fail_writes("/noperm", errno.EACCES),
    "compare-output-read-only": fail_writes("/rofs", errno.EROFS),
    "train-output-permission": fail_writes("/noperm", errno.EACCES),
    "train-output-read-only": fail_writes("/rofs", errno.EROFS),
    "data-cache-read-only": fail_writes("/rofs", errno.EROFS),
    "pretrained-weights-no-dns": lambda: _no_dns(),
    "per-process-batch-below-minimum": lambda: _as_two_processes(),
}
ENV = {
    "data-cache-read-only": {"SSLBENCH_CACHE": "{rofs}/cache"},
    "pretrained-weights-offline": {"HF_HUB_OFFLINE": "1", "HF_HOME": "{root}/hf"},
    "pretrained-weights-no-dns": {"HF_HOME": "{root}/hf"},
    "hub-dataset-offline": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": "{root}/hf"},
    "callbacks-env-unknown": {"SSLBENCH_CALLBACKS": "no_such_module:Thing"},
    "hf-image-folder-one-class": {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1"},  # (the datasets library's own progress lines)
    "hf-csv-missing-images": {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1"},
}


def _no_dns() -> None:
    """No network: every host name lookup fails, as on an offline machine."""
    import socket

    def getaddrinfo(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    socket.getaddrinfo = getaddrinfo
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.pop(key, None)


def _as_two_processes() -> None:
    """The trainer runs as rank 0 of 2 processes without starting the other: Accelerate reports 2
    processes, and the one collective before the data is loaded (the run directory's claim,
    ``run_setup.on_main``) broadcasts to nobody. Enough for the checks that setup makes from the
    number of processes; nothing here may reach a training step."""
    import accelerate
    import accelerate.utils

    accelerate.Accelerator.num_processes = property(lambda self: 2)  # type: ignore[assignment]
    accelerate.utils.broadcast_object_list = lambda box, from_process=0: box


def _train_run(data: Path, out: Path, env: dict[str, str]) -> None:
    r = run_forked(
        ["train", "--method", "simclr", "--data", f"imagefolder:{data}", "--steps", "2", *TINY, "--set", "quick_knn=false", "--output", str(out)], env
    )
    assert r.returncode == 0, r.describe()


def _with_other_backbone(run: Path, copy: Path) -> Path:
    """A copy of ``run`` whose config.yaml asks for other widths than its checkpoints and encoder hold."""
    shutil.copytree(run, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["backbone_kwargs"]["channels"] = [16, 32, 64, 128]
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    return copy


def _write_odd_images(folder: Path, rng: np.random.Generator) -> int:
    """RGB, grayscale, grayscale+alpha, RGBA, palette with transparency, 16-bit grayscale and CMYK
    images (all must be converted to RGB) plus two unreadable files; returns the readable count."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(rgb[..., :2], "LA").save(folder / "gray_alpha.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA").save(folder / "rgba.png")
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.info["transparency"] = 0
    pal.save(folder / "palette.png", transparency=0)
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 200).save(folder / "gray16.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    good = (folder / "rgb.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 3])
    (folder / "garbage.jpg").write_bytes(b"this is not a jpeg" * 10)
    return 7


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """Run the whole table (and the subprocess subset) once; tests look up their case."""
    root = tmp_path_factory.mktemp("cli")
    env = child_env(root / "cache")
    data = make_image_folder(root / "data")
    run = root / "run"
    _train_run(data, run, env)

    empty = root / "empty"
    for split in ("train", "test"):
        (empty / split / "c0").mkdir(parents=True)
    trainonly = root / "trainonly"
    make_image_folder(trainonly, classes=2, train=2, test=0)
    shutil.rmtree(trainonly / "test")
    corrupt = root / "corrupt"
    for split in ("train", "test"):
        (corrupt / split / "c0").mkdir(parents=True)
        (corrupt / split / "c0" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    a_file = root / "a-regular-file"
    a_file.write_text("not a directory")
    (root / "bad.yaml").write_text("lr: [0.1\nsteps: 3\n")
    (root / "list.yaml").write_text("- lr\n- 0.1\n")
    (root / "typo.yaml").write_text("lrr: 0.1\n")
    (root / "section.yaml").write_text("method_cfg: 5\n")
    (root / "intkey.yaml").write_text("1: 2\n")
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00bad")
    results = root / "results.jsonl"
    results.write_text('{"method": "simclr", "backbone": "resnet18", "data": "digits", "metrics": {"knn_top1": 50.0}}\n')
    (root / "garbage.jsonl").write_text("garbage\n")
    tmp = root / "scratch"
    tmp.mkdir()
    onecls = make_image_folder(root / "onecls", classes=1, train=8, test=4)
    oneimg = make_image_folder(root / "oneimg", classes=1, train=1, test=1)
    hfone = make_image_folder(root / "hfone", classes=1, train=4, test=0)
    (root / "missing.csv").write_text("image,label\nimg/a.png,cat\nimg/b.png,dog\n")
    differ = root / "differ"
    make_image_folder(differ, classes=2, train=2, test=2)
    (differ / "test" / "c1").rename(differ / "test" / "other")
    (root / "both.yaml").write_text("epochs: 2\nsteps: 3\n")
    (root / "fp16.yaml").write_text("precision: fp16\n")
    (root / "methodkey.yaml").write_text("method_cfg:\n  temprature: 0.1\n")
    (root / "methodtemp.yaml").write_text("method_cfg:\n  temperature: 0.1\n")
    (root / "badtype.yaml").write_text("lr: fast\n")
    (root / "badrange.yaml").write_text("epochs: 0\n")
    (root / "badtuple.yaml").write_text("aug:\n  crop_scale: [0.2, 0.5, 0.9]\n")
    for name in ("rofs", "noperm", "dir.jsonl"):
        (root / name).mkdir()
    copies = {}
    for name, change in (
        ("no_encoder", lambda d: (d / "encoder.safetensors").unlink()),
        ("bad_encoder", lambda d: (d / "encoder.safetensors").write_bytes(b"not safetensors")),
        ("bad_budget", lambda d: (d / "budget.json").write_text("{oops")),
        ("bad_config", lambda d: (d / "config.yaml").write_text("lr: [0.1\n")),
        ("busy", lambda d: None),
        ("bad_key", lambda d: (d / "config.yaml").write_text((d / "config.yaml").read_text() + "bogus_key: 1\n")),
    ):  # (refused commands that lock it for a moment: the eval cases use "run")
        copies[f"run_{name}"] = root / f"run-{name}"
        shutil.copytree(run, copies[f"run_{name}"])
        change(copies[f"run_{name}"])
    locked_run, locked_cmp = root / "locked-run", root / "locked-cmp"
    shutil.copytree(run, locked_run)
    locked_cmp.mkdir()
    locks = [RunLock(locked_run).acquire(), RunLock(locked_cmp).acquire()]  # held by this process while the table runs
    cmp_other = root / "cmp-other"
    (cmp_other / "simclr-seed0").mkdir(parents=True)
    shutil.copy(run / "config.yaml", cmp_other / "simclr-seed0" / "config.yaml")
    fill = {
        "data": data,
        "empty": empty,
        "trainonly": trainonly,
        "corrupt": corrupt,
        "file": a_file,
        "run": run,
        "tmp": tmp,
        "bad_yaml": root / "bad.yaml",
        "list_yaml": root / "list.yaml",
        "typo_yaml": root / "typo.yaml",
        "section_yaml": root / "section.yaml",
        "intkey_yaml": root / "intkey.yaml",
        "binary_yaml": root / "binary.yaml",
        "results": results,
        "garbage_jsonl": root / "garbage.jsonl",
        "run_other_backbone": _with_other_backbone(run, root / "run-other-backbone"),
        "eval_other_backbone": _with_other_backbone(run, root / "eval-other-backbone"),
        "onecls": onecls,
        "hfone": hfone,
        "oneimg": oneimg,
        "csv_missing": root / "missing.csv",
        "differ": differ,
        "root": root,
        "rofs": root / "rofs",
        "noperm": root / "noperm",
        "dir_jsonl": root / "dir.jsonl",
        "locked_run": locked_run,
        "locked_cmp": locked_cmp,
        "cmp_other": cmp_other,
        **{f"{name}_yaml": root / f"{name}.yaml" for name in ("both", "fp16", "methodkey", "methodtemp", "badtype", "badrange", "badtuple")},
        **copies,
    }
    argv = {case: [a.format(**fill) for a in args] for case, (args, _) in CASES.items()}
    envs = {case: {**env, **{k: v.format(**fill) for k, v in ENV.get(case, {}).items()}} for case in CASES}
    snapshot = _snapshot(fill)
    try:
        with ThreadPoolExecutor(2) as pool:
            real = {case: pool.submit(run_subprocess, argv[case], env) for case in SUBPROCESS_CASES}
            results = run_many({case: (args, envs[case], BEFORE.get(case)) for case, args in argv.items()})
            subprocess_results = {case: f.result() for case, f in real.items()}
    finally:
        for lock in locks:
            lock.release()
    return {"results": results, "subprocess": subprocess_results, "fill": fill, "env": env, "snapshot": snapshot}


def _snapshot(fill) -> dict[str, bytes]:
    """The bytes of every file in the directories the failing commands name (to show nothing changed)."""
    out = {}
    for key in ("run", "run_busy", "locked_run", "locked_cmp", "cmp_other", "onecls", "rofs", "noperm", "dir_jsonl"):
        for p in sorted(Path(fill[key]).rglob("*")):
            if p.is_file() and p.name != "run.lock":  # (the test's own locks, released before the comparison)
                out[str(p)] = p.read_bytes()
    out[str(fill["results"])] = Path(fill["results"]).read_bytes()
    return out


def _assert_one_line_error(r, phrases) -> None:
    assert r.returncode == 2, r.describe()
    assert "Traceback" not in r.stderr, r.describe()
    err = lines(r.stderr)
    assert len(err) == 1, r.describe()
    assert err[0].startswith("sslbench: error: "), r.describe()
    for phrase in phrases:
        assert phrase in err[0], f"{phrase!r} not in: {err[0]}"


def test_table_has_enough_cases():
    assert len(CASES) >= 100
    commands = {args[0] for args, _ in CASES.values()}
    assert {"train", "eval", "compare", "leaderboard", "list"} <= commands


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_and_exit_code_2(table, case):
    _assert_one_line_error(table["results"][case], CASES[case][1])


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_user_error_through_python_m_sslbench(table, case):
    _assert_one_line_error(table["subprocess"][case], CASES[case][1])


def test_nothing_half_written_by_failed_commands(table):
    fill = table["fill"]
    assert sorted(p.name for p in fill["tmp"].iterdir()) == []  # failing runs leave no directories behind
    other = fill["run_other_backbone"]
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == ["step-00000002"]  # untouched
    assert not any(p.name.startswith(".tmp") for p in (other / "checkpoints").iterdir())
    # the refused resume, eval --results and leaderboard --output left the files they named intact
    run = fill["run"]
    assert yaml.safe_load((run / "config.yaml").read_text())["steps"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]
    assert fill["results"].read_text().startswith('{"method": "simclr"')
    # every file the failing commands could have touched is as it was, and no one wrote into the
    # read-only, forbidden or locked places (the run in use keeps its lock file: its holder ended normally)
    after = _snapshot(fill)
    changed = sorted(k for k in set(after) | set(table["snapshot"]) if after.get(k) != table["snapshot"].get(k))
    assert changed == [], changed
    assert not (fill["root"] / "hf").exists() or not any((fill["root"] / "hf").rglob("*.safetensors"))


def test_debug_shows_the_traceback(table):
    r = run_forked(["--debug", "train", "--method", "simclrr"], table["env"])
    assert r.returncode == 1 and "Traceback" in r.stderr and "UserError: unknown method 'simclrr'" in r.stderr, r.describe()


def test_a_real_bug_keeps_its_traceback(table):
    def bug() -> None:
        import sslbench.commands.cli

        def broken(args):
            raise KeyError("a bug, not a user error")

        sslbench.commands.cli.cmd_list = broken

    r = run_forked(["list", "methods"], table["env"], before=bug)
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError" in r.stderr, r.describe()


def test_disk_full_while_writing_results_keeps_the_previous_file(table, tmp_path):
    """ENOSPC while writing results.json (patched ``open`` in the child): exit 2, one error line,
    the previous results.json intact and no temporary file left."""
    run = tmp_path / "run"
    shutil.copytree(table["fill"]["run"], run)
    before = (run / "results.json").read_bytes()

    def disk_full() -> None:
        real_open = builtins.open

        class Full:
            def __init__(self, f, name):
                self.f, self.name = f, name

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)

            def __getattr__(self, attr):
                return getattr(self.f, attr)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and os.path.basename(os.fspath(file)).startswith("results.json") and "w" in mode:
                return Full(f, os.fspath(file))
            return f

        builtins.open = fake_open

    r = run_forked(["train", "--output", str(run), "--resume", "--quiet"], table["env"], before=disk_full)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.describe()
    errors = [line for line in lines(r.stderr) if line.startswith("sslbench: error")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "results.json" in errors[0], r.describe()
    assert "--resume" in errors[0]
    assert [line for line in lines(r.stderr) if not line.startswith("sslbench: error")] == [f"resuming {run} from step 2 (step-00000002)"]
    assert (run / "results.json").read_bytes() == before
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]


def test_corrupt_grayscale_and_alpha_images_train_with_a_count(table, tmp_path):
    """Unreadable files are skipped and counted in one warning; grayscale, alpha, palette, 16-bit
    and CMYK images are converted to RGB; training works."""
    rng = np.random.default_rng(1)
    root = tmp_path / "odd"
    for split in ("train", "test"):
        for c in ("a", "b"):
            _write_odd_images(root / split / c, rng)
    r = run_forked(
        [
            "train",
            "--data",
            f"imagefolder:{root}",
            "--steps",
            "2",
            *TINY,
            "--batch-size",
            "8",
            "--set",
            "quick_knn=false",
            "--output",
            str(tmp_path / "run"),
        ],
        table["env"],
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.describe()
    warnings = [line for line in lines(r.stderr) if "unreadable" in line]
    assert len(warnings) == 1 and "skipped 4 unreadable image(s)" in warnings[0], r.describe()
    assert (tmp_path / "run" / "encoder.safetensors").is_file()


def test_environment_oserrors_are_one_line_and_bugs_are_not(table):
    from sslbench.commands.cli import _environment_error

    assert "No space left on device" in _environment_error(OSError(errno.ENOSPC, "No space left on device"))
    assert "Permission denied: /data/x" in _environment_error(PermissionError(errno.EACCES, "Permission denied", "/data/x"))
    assert _environment_error(OSError(errno.EBADF, "Bad file descriptor")) is None  # a bug: keeps its traceback
    assert _environment_error(FileNotFoundError(errno.ENOENT, "No such file or directory")) is None  # no path: a bug
    assert _environment_error(RuntimeError("shape mismatch")) is None

    def read_only_cache() -> None:  # an OSError from deep inside, not wrapped in a UserError
        import sslbench.train.run_setup

        def load_split(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", "/cache/decoded/x.pt")

        sslbench.train.run_setup.load_split = load_split

    r = run_forked(
        ["train", "--data", "imagefolder:{}".format(table["fill"]["data"]), *TINY, "--output", str(table["fill"]["tmp"] / "rofs")],
        table["env"],
        before=read_only_cache,
    )
    _assert_one_line_error(r, ["Read-only file system: /cache/decoded/x.pt"])


def test_a_per_process_batch_below_the_minimum_is_refused_without_sync_bn():
    """BYOL (BatchNorm in its heads, min_batch_size 2) at --batch-size 2 on 2 processes with
    sync_bn=false gives each process's BatchNorm one image: refused, naming --batch-size, the number
    of processes and the fix (issue 34). With sync_bn on (the default) the statistics are those of
    the global batch, so the same batch trains what one process trains: allowed."""
    from sslbench.config import build_config
    from sslbench.core.errors import UserError
    from sslbench.train.run_setup import make_plan

    unsynced = build_config(flags={"method": "byol", "batch_size": 2}, sets=["sync_bn=false"])
    with pytest.raises(UserError, match=r"^--batch-size 2 over 2 processes is 1 image per process, fewer than the 2 that byol needs") as err:
        make_plan(unsynced, 64, 2, 2)
    assert "pass --batch-size 4 or more (2 per process)" in str(err.value) and "keep sync_bn on" in str(err.value)
    with pytest.raises(UserError, match="--batch-size 4 over 4 processes is 1 image per process.*--batch-size 8 or more"):
        make_plan(build_config(flags={"method": "byol", "batch_size": 4}, sets=["sync_bn=false"]), 64, 4, 2)
    with pytest.raises(UserError, match=r"the batch of 2 \(all the training images\) over 2 processes.*add training images \(4 or more\)"):
        make_plan(build_config(flags={"method": "byol", "batch_size": 16}, sets=["sync_bn=false"]), 3, 2, 2)  # cut to the data
    assert make_plan(unsynced, 64, 1, 2).local_batch == 2  # one process: its batch is the global one
    assert make_plan(build_config(flags={"method": "byol", "batch_size": 4}, sets=["sync_bn=false"]), 64, 2, 2).local_batch == 2
    assert make_plan(build_config(flags={"method": "byol", "batch_size": 2}), 64, 2, 2).local_batch == 1  # sync_bn: global statistics
    assert make_plan(build_config(flags={"method": "mae", "batch_size": 2}, sets=["sync_bn=false"]), 64, 2, 1).local_batch == 1  # no minimum
