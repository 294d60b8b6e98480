"""Write the workbook notebooks (01..05) from the cell sources below.

Edit the cells here, then run `python notebooks/make_notebooks.py`: the .ipynb files are
regenerated without outputs (so they stay small and diff cleanly). Each notebook starts with
a title and an "Open in Colab" badge, then its parameters cell (tagged "parameters", as
papermill expects; self-contained), whose defaults are sized for CI on the committed sample
(full-run values are given beside them), then a Colab-only install cell.
"""

from __future__ import annotations

import sys
from pathlib import Path
from textwrap import dedent

import nbformat

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from vprlib.fileio import atomic_write_text  # noqa: E402

REPO = "vprlib/vprlib"  # GitHub <org>/<repo> used by the Colab badges and the Colab install


def md(text: str):
    return nbformat.v4.new_markdown_cell(dedent(text).strip())


def code(text: str):
    return nbformat.v4.new_code_cell(dedent(text).strip())


def header(filename: str, title: str, intro: str) -> list:
    badge = (
        f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"(https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{filename})"
    )
    colab = f"""
    # Colab only: fetch the project and install it (does nothing anywhere else).
    import os
    import subprocess
    import sys

    if "google.colab" in sys.modules:
        if not os.path.isdir("/content/vprlib"):
            subprocess.run(["git", "clone", "--depth", "1",
                            "https://github.com/{REPO}", "/content/vprlib"], check=True)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e",
                            "/content/vprlib[colab]"], check=True)  # not jupyterlab
        os.chdir("/content/vprlib/notebooks")
        sys.path.insert(0, "/content/vprlib")
    """
    return [md(f"# {title}\n\n{badge}\n\n{dedent(intro).strip()}"), code(colab)]


# Shared parameter lines: the data root and where figures go.
DATA_PARAMS = """
import os
from pathlib import Path

# Data: the committed sample by default; point VPRLIB_DATA at the full data (GSV-Cities/ and
# benchmarks/ inside) for a real run.
DATA_ROOT = Path(os.environ.get("VPRLIB_DATA", "../data/sample"))
GSV_ROOT = Path(os.environ.get("GSV_CITIES_ROOT", DATA_ROOT / "GSV-Cities"))
BENCH_ROOT = Path(os.environ.get("VPR_BENCHMARKS_ROOT", DATA_ROOT / "benchmarks"))
# Figures go to ../figures (VPRLIB_FIGURES elsewhere: `make test` keeps them out of the repo).
FIGURES = Path(os.environ.get("VPRLIB_FIGURES", "../figures"))
"""


# ------------------------------------------------------------------------------------------
# 01 explore the dataset


def nb01() -> list:
    name = "01_explore_dataset.ipynb"
    return [
        *header(
            name,
            "01 · Explore GSV-Cities",
            """
            GSV-Cities groups Google Street View images into **places**: 4 to 20 images of the
            same spot taken years apart, with different headings, seasons and occluders. This
            notebook reads the per-city CSV files, summarises them, plots the statistics, maps
            the places and browses the images of one place.

            By default it runs on the small committed sample (`data/sample`, synthetic images
            with real-city coordinates); set `VPRLIB_DATA` to the folder holding the real
            `GSV-Cities/` (Kaggle, ~22 GB) for the full picture: ~62k places, ~530k images.
            """,
        ),
        code(
            DATA_PARAMS
            + """
CITY = None  # a city_id to map in detail; None = the city with the most places
"""
        ),
        code(
            """
            import vprlib
            from vprlib import maps, plots, widgets

            FIGURES.mkdir(parents=True, exist_ok=True)
            """
        ),
        md(
            """
            ## One row per image

            `read_gsv_dataframes` reads every `Dataframes/<City>.csv` and adds two columns:
            `place` (a place id unique across cities: `place_id` repeats from city to city)
            and `path` (the image file relative to the GSV-Cities root, as it exists on disk).
            """
        ),
        code(
            """
            df = vprlib.read_gsv_dataframes(GSV_ROOT)
            print(f"{len(df):,} images of {df['place'].nunique():,} places in {df['city_id'].nunique()} cities")
            df.head()
            """
        ),
        md("## Per-city summary"),
        code(
            """
            summary = vprlib.gsv_cities.city_summary(df)
            summary
            """
        ),
        md(
            """
            ## Statistics

            Images per place (the paper keeps places with at least 4), when the images were
            taken, and where the camera looked. `northdeg` is not always below 360 (the dataset
            README shows 584), so headings are taken modulo 360.
            """
        ),
        code(
            """
            fig = plots.plot_images_per_place(df)
            plots.save_figure(fig, FIGURES / "01_images_per_place.png");
            """
        ),
        code(
            """
            fig = plots.plot_years(df)
            plots.save_figure(fig, FIGURES / "01_years.png");
            """
        ),
        code(
            """
            fig = plots.plot_months(df)
            plots.save_figure(fig, FIGURES / "01_months.png");
            """
        ),
        code(
            """
            fig = plots.plot_headings(df)
            plots.save_figure(fig, FIGURES / "01_headings.png");
            """
        ),
        md(
            """
            ## Maps

            All cities (circle area ~ number of places; click for counts), then one city's
            places, clustered (zoom in to split clusters) with a density layer you can switch
            on in the layer control, then the images of one place with the direction each
            camera looked.
            """
        ),
        code(
            """
            maps.cities_map(df)
            """
        ),
        code(
            """
            city = CITY or df.groupby("city_id")["place"].nunique().idxmax()
            maps.city_map(df, city)
            """
        ),
        code(
            """
            sizes = df.groupby("place").size()
            place = int(sizes.idxmax())  # the place with the most images
            print(f"place {place}: {sizes[place]} images in {df.loc[df['place'] == place, 'city_id'].iloc[0]}")
            maps.place_map(df, place)
            """
        ),
        md(
            """
            ## Pandas recipes

            The DataFrame is plain pandas, so the usual selections work as-is. Note that
            `place_id` is unique only *within* a city: group by `place` (or by
            `["city_id", "place_id"]`) when counting across cities.
            """
        ),
        code(
            """
            # The dataset README's recipe, as-is, on one city's rows (place_id is unique per city):
            one_city = df[df["city_id"] == city]
            kept = one_city[one_city.groupby("place_id")["place_id"].transform("size") >= 8]
            print(f"{city}: {kept['place_id'].nunique()} of {one_city['place_id'].nunique()} places have >= 8 images")

            # Across cities, group by the unique `place` column (what filter_min_images does):
            at_least_8 = df[df.groupby("place")["place"].transform("size") >= 8]
            assert at_least_8.equals(vprlib.gsv_cities.filter_min_images(df, 8))
            print(f"all cities: {at_least_8['place'].nunique():,} places with >= 8 images "
                  f"({len(at_least_8):,} images)")
            """
        ),
        code(
            """
            # northern hemisphere, taken 2012-2016, in July, places keeping >= 16 such images
            sel = df[(df["lat"] > 0) & df["year"].between(2012, 2016) & (df["month"] == 7)]
            print(f"northern hemisphere, 2012-2016, July: {len(sel):,} images "
                  f"of {sel['place'].nunique():,} places")
            sel = sel[sel.groupby("place")["place"].transform("size") >= 16]
            print(f"... of which in places with >= 16 such images: {len(sel):,} images, "
                  f"{sel['place'].nunique():,} places")

            # The same with the helpers of vprlib.gsv_cities:
            from vprlib.gsv_cities import filter_dates, filter_hemisphere, filter_min_images

            same = filter_min_images(
                filter_dates(filter_hemisphere(df, "north"), years=range(2012, 2017), months=7), 16
            )
            assert same.equals(sel)
            """
        ),
        md(
            """
            The last count is **0** on the sample, and expected: sample places have at most 12
            images spread over 15 years and all months, so no place has 16 images from the
            Julys of 2012-2016. Even on the full dataset (at most 20 images per place) such
            places are rare; the cell shows how to combine row filters with a per-place count.
            Note the order: filtering rows first and counting afterwards keeps only places with
            16 images *that pass the filters*.
            """
        ),
        md(
            """
            ## Browse places

            Pick a city, then a place: its images are shown oldest first with date and heading,
            followed by the metadata rows. (Widgets need a live kernel: in a static view of the
            notebook only the first place is shown.)
            """
        ),
        code(
            """
            widgets.place_browser(df, GSV_ROOT)
            """
        ),
    ]


# ------------------------------------------------------------------------------------------
# 02 train Conv-AP


def nb02() -> list:
    name = "02_train_convap.ipynb"
    return [
        *header(
            name,
            "02 · Train Conv-AP on GSV-Cities",
            """
            Train the paper's model: a ResNet backbone, the **Conv-AP** aggregator (1x1 conv,
            adaptive average pool to 2x2, flatten, L2) and the **Multi-Similarity** loss on
            batches of P places x K images.

            The defaults train a tiny model (ResNet18 without layer4, 64x64 images, 5 short
            epochs) on the committed sample so the notebook runs in about a minute on a CPU.
            Set `FULL_RUN = True` on a GPU with the real data for the paper's recipe:
            ResNet50 (ImageNet weights, conv1..layer2 frozen), 320x320 images, 100 places x 4
            images per batch, SGD lr 0.05 (from later work; the paper used 0.03) with warm-up and steps at epochs 5, 10, 15, 25.
            """,
        ),
        code(
            DATA_PARAMS
            + """
FULL_RUN = False  # True: the paper's recipe (needs a GPU and the full dataset)
USE_DRIVE = False  # Colab: keep checkpoints on Google Drive and resume after a disconnect

if FULL_RUN:
    BACKBONE, PRETRAINED, LAYERS_TO_CROP = "resnet50", True, []  # released 4096-d layout
    LAYERS_TO_FREEZE = 2  # conv1..layer2 keep their ImageNet weights
    AGG_CONFIG = {"out_channels": 1024, "s1": 2, "s2": 2}  # 2048 -> 1024 channels, 2x2
    IMAGE_SIZE = (320, 320)
    PLACES_PER_BATCH, IMG_PER_PLACE = 100, 4
    EPOCHS, MAX_STEPS_PER_EPOCH = 30, None
    OPTIMIZER, LR, WEIGHT_DECAY, WARMUP_STEPS = "sgd", 0.05, 1e-3, 650
    AUGMENT = True  # RandAugment(num_ops=3), as the paper
    VAL = "pitts30k_val"  # any benchmark under BENCH_ROOT
else:
    BACKBONE, PRETRAINED, LAYERS_TO_CROP = "resnet18", False, [4]  # small and offline
    LAYERS_TO_FREEZE = -1  # from scratch: train every layer (random weights are not worth freezing)
    AGG_CONFIG = {"out_channels": 128, "s1": 2, "s2": 2}  # 512-d descriptors
    IMAGE_SIZE = (64, 64)
    PLACES_PER_BATCH, IMG_PER_PLACE = 16, 4
    EPOCHS, MAX_STEPS_PER_EPOCH = 5, None
    # From scratch and for a few minutes, AdamW without augmentation learns fastest here.
    OPTIMIZER, LR, WEIGHT_DECAY, WARMUP_STEPS = "adamw", 1e-3, 0.0, 4
    AUGMENT = False
    VAL = "gsv_sample"

CHECKPOINT_DIR = Path("../checkpoints/02_convap")  # notebooks 03 and 04 read last.ckpt here
# (with USE_DRIVE it goes to Drive: set VPRLIB_WEIGHTS to that last.ckpt for 03 and 04)
# A full run continues the run CHECKPOINT_DIR holds (after a disconnect); a tiny run starts
# over: the training cell clears it, as fit itself never overwrites a run.
RESUME = "auto" if FULL_RUN else False
"""
        ),
        code(
            """
            if USE_DRIVE:
                from google.colab import drive

                drive.mount("/content/drive")
                CHECKPOINT_DIR = Path("/content/drive/MyDrive/vprlib/checkpoints/02_convap")
            """
        ),
        code(
            """
            import pandas as pd
            import torch

            import vprlib
            from vprlib import plots

            torch.manual_seed(0)  # the same initial weights on every run
            FIGURES.mkdir(parents=True, exist_ok=True)
            """
        ),
        md(
            """
            ## The training set: P places x K images

            Each item of `GSVCitiesDataset` is one place: K of its images (uint8) and K copies
            of its label. A batch stacks P places, so every image has K-1 positives (same
            place) and (P-1)K negatives in the batch.
            """
        ),
        code(
            """
            train_ds = vprlib.GSVCitiesDataset(
                GSV_ROOT, img_per_place=IMG_PER_PLACE, min_img_per_place=IMG_PER_PLACE,
                image_size=IMAGE_SIZE, augment=AUGMENT,
            )
            print(f"{len(train_ds):,} places, {train_ds.num_images:,} images")
            images, labels = train_ds.collate_fn([train_ds[i] for i in range(PLACES_PER_BATCH)])
            print("batch:", tuple(images.shape), images.dtype, "labels:", tuple(labels.shape))
            """
        ),
        code(
            """
            fig = plots.show_batch(images, labels, max_places=6)
            plots.save_figure(fig, FIGURES / "02_batch.png");
            """
        ),
        md("## The model"),
        code(
            """
            model = vprlib.VPRModel(
                backbone=BACKBONE, pretrained=PRETRAINED, layers_to_freeze=LAYERS_TO_FREEZE,
                layers_to_crop=LAYERS_TO_CROP, agg="convap", agg_config=AGG_CONFIG,
            )
            model.preprocess = {"image_size": IMAGE_SIZE}  # evaluation resizes like training
            n_params = sum(p.numel() for p in model.parameters())
            print(f"{BACKBONE} + Conv-AP: {model.descriptor_dim}-d descriptors, {n_params / 1e6:.1f} M parameters")
            """
        ),
        md(
            """
            ## Before training

            Recall@K of the untrained network on the evaluation set: the baseline the training
            has to beat. A query counts as found at K if one of its K nearest database images
            lies within 25 m.
            """
        ),
        code(
            """
            val = vprlib.load_benchmark(VAL, root=BENCH_ROOT)
            before = vprlib.evaluate(model, val, progress=False)
            print(before.summary())
            """
        ),
        md(
            """
            ## Train

            `fit` shows a progress bar per epoch (loss, b_acc = share of images that produced no
            informative pair, images/s), evaluates on `VAL` after each epoch and writes
            `last.ckpt` (and `best.ckpt`) to `CHECKPOINT_DIR`.
            """
        ),
        code(
            """
            import shutil

            if not RESUME and (CHECKPOINT_DIR / "last.ckpt").exists():
                shutil.rmtree(CHECKPOINT_DIR)  # the earlier tiny run (see RESUME above)
            history = vprlib.fit(
                model, train_ds, epochs=EPOCHS, places_per_batch=PLACES_PER_BATCH,
                optimizer=OPTIMIZER, lr=LR, weight_decay=WEIGHT_DECAY, warmup_steps=WARMUP_STEPS,
                max_steps_per_epoch=MAX_STEPS_PER_EPOCH,
                val=val, checkpoint_dir=CHECKPOINT_DIR, resume=RESUME, seed=0,
            )
            history
            """
        ),
        code(
            """
            fig = plots.plot_history(history)
            plots.save_figure(fig, FIGURES / "02_history.png");
            """
        ),
        md(
            """
            `epoch` counts from 0, as `milestones` do (the progress bars and the plot count
            from 1); the recall columns are fractions in [0, 1] (the tables below show percent).
            The loss falls and recall rises even in the tiny run. b_acc stays near 0 at first:
            with random weights nearly every image still forms hard pairs; it climbs as the
            model learns (over epochs of the full run).
            """
        ),
        md(
            """
            ## Checkpoint

            `last.ckpt` holds the weights in the released key layout plus the model config, the
            preprocessing validation used (image size), the optimizer, scheduler and RNG
            states (so `resume=True` continues exactly). `load_pretrained` reads it back, as
            notebook 03 does, and evaluates at the size it was validated at.
            """
        ),
        code(
            """
            for f in sorted(CHECKPOINT_DIR.glob("*.ckpt")):
                print(f"{f}  {f.stat().st_size / 1e6:.1f} MB")
            reloaded = vprlib.load_pretrained(CHECKPOINT_DIR / "last.ckpt")
            print("preprocess:", reloaded.preprocess)
            """
        ),
        md("## Untrained vs trained"),
        code(
            """
            after = vprlib.evaluate(reloaded, val, progress=False)
            comparison = pd.concat([before.table(), after.table()]).assign(model=["untrained", "trained"])
            comparison.set_index("model")
            """
        ),
        code(
            """
            fig = plots.plot_recalls({"untrained": before.recalls, "trained": after.recalls},
                                     title=f"Recall@K on {val.name}: untrained vs trained")
            plots.save_figure(fig, FIGURES / "02_recalls.png");
            """
        ),
    ]


# ------------------------------------------------------------------------------------------
# 03 pretrained weights


# Notebooks 03 and 04 read notebook 02's checkpoint by default: when it is not there (02 not
# run yet, a fresh Colab runtime) they train the same tiny model first, so each runs alone.
TRAIN_IF_MISSING = """
if str(WEIGHTS) == "../checkpoints/02_convap/last.ckpt" and not Path(WEIGHTS).is_file():
    print(f"{WEIGHTS} not found (run notebook 02 first to train it there): training "
          "notebook 02's tiny Conv-AP on the sample now (a minute or two on a CPU)")
    torch.manual_seed(0)
    tiny = vprlib.VPRModel("resnet18", layers_to_freeze=-1, layers_to_crop=[4], agg="convap",
                           agg_config={"out_channels": 128, "s1": 2, "s2": 2})
    tiny.preprocess = {"image_size": (64, 64)}
    vprlib.fit(tiny, vprlib.GSVCitiesDataset(GSV_ROOT, image_size=(64, 64), augment=False),
               epochs=5, places_per_batch=16, optimizer="adamw", lr=1e-3, weight_decay=0.0,
               warmup_steps=4, checkpoint_dir=Path(WEIGHTS).parent, seed=0, progress=False)
"""


PAPER_TABLE = """
# The released Conv-AP checkpoints (ResNet50) and the paper's recall (R@1 / R@5, percent).
paper = pd.DataFrame(
    [
        ("resnet50_ConvAP_2048_2x2", 8192, 92.8, 97.7, 90.5, 95.2, 83.1, 90.3, 42.7, 58.8),
        ("resnet50_ConvAP_1024_2x2", 4096, 92.5, 97.7, 90.5, 95.3, 83.5, 89.7, 42.6, 59.8),
        ("resnet50_ConvAP_512_2x2", 2048, 92.3, 97.5, 90.6, 95.1, 83.4, 90.3, 40.3, 56.6),
        ("resnet50_ConvAP_128_2x2", 512, 90.7, 96.6, 89.1, 94.6, 82.6, 90.0, 36.3, 53.1),
    ],
    columns=["weights", "descriptor_dim",
             "pitts250k_test R@1", "pitts250k_test R@5", "pitts30k_test R@1", "pitts30k_test R@5",
             "msls_val R@1", "msls_val R@5", "nordland R@1", "nordland R@5"],
).set_index("weights")
paper
"""


def nb03() -> list:
    name = "03_pretrained_weights.ipynb"
    return [
        *header(
            name,
            "03 · Pretrained weights",
            """
            The authors released four Conv-AP models (ResNet50, descriptors of 512 to 8192
            dimensions). This notebook lists them with the paper's results, loads weights (a
            released name, downloaded once, or a local file), evaluates them on every benchmark
            found under the data root and sets our numbers beside the paper's.

            CI runs offline: by default it loads the checkpoint notebook 02 trained (tiny, so
            its recall says nothing about the paper). With network access set
            `WEIGHTS = "resnet50_ConvAP_1024_2x2"` (or `VPRLIB_WEIGHTS`) and point `VPRLIB_DATA`
            at real benchmarks (Pitts30k, MSLS-val, Nordland, ...). The image size comes with
            the weights (320x320 for the released ones; a vprlib checkpoint records its own).
            """,
        ),
        code(
            DATA_PARAMS
            + """
# A released name (resnet50_ConvAP_{2048,1024,512,128}_2x2, needs network once) or a file.
WEIGHTS = os.environ.get(
    "VPRLIB_WEIGHTS", "../checkpoints/02_convap/last.ckpt"
)  # written by notebook 02 (run it first), or a released name such as "resnet50_ConvAP_1024_2x2"
IMAGE_SIZE = None  # None: as WEIGHTS says (its checkpoint, else 320x320); or (H, W)
PAPER_MODEL = "resnet50_ConvAP_1024_2x2"  # the paper row to compare against
"""
        ),
        code(
            """
            import pandas as pd

            import vprlib
            from vprlib import plots
            from vprlib.benchmarks import FOLDER_LAYOUTS

            FIGURES.mkdir(parents=True, exist_ok=True)
            """
        ),
        md("## Released weights and the paper's results"),
        code(PAPER_TABLE),
        code(
            """
            fig = plots.plot_size_vs_recall(
                paper.reset_index(), title="Released Conv-AP models: descriptor size vs R@1 (paper)")
            plots.save_figure(fig, FIGURES / "03_size_vs_recall.png");
            """
        ),
        md(
            """
            Going from 8192 to 2048 dimensions costs almost nothing on the city benchmarks (about 2
            points on Nordland); 512 dimensions lose 1-2 points on the city benchmarks and more on Nordland (seasonal changes on a train
            line, far from the training domain).

            ## Load weights

            `load_pretrained` accepts a released name (downloaded once to the torch hub cache)
            or a path; the architecture comes from the checkpoint's config or is inferred from
            its keys, and the weights load strictly (a mismatch lists the keys).
            """
        ),
        code(
            dedent(
                """
                import torch
                """
            )
            + TRAIN_IF_MISSING
        ),
        code(
            """
            size = {} if IMAGE_SIZE is None else {"image_size": IMAGE_SIZE}
            model = vprlib.load_pretrained(WEIGHTS, **size)
            print(f"{WEIGHTS}: {model.config['backbone']} + {model.config['agg']}, "
                  f"{model.descriptor_dim}-d, preprocess {model.preprocess['image_size']}")
            """
        ),
        md("## Evaluate on every benchmark found"),
        code(
            """
            benchmarks = {}
            for name in FOLDER_LAYOUTS:
                try:
                    benchmarks[name] = vprlib.load_benchmark(name, root=BENCH_ROOT)
                except FileNotFoundError:
                    continue  # not downloaded: skipped
            pd.DataFrame(
                [{"benchmark": name, "#db": b.num_db, "#queries": b.num_queries, "format": b.fmt,
                  "variant": b.variant} for name, b in benchmarks.items()]
            )
            """
        ),
        code(
            """
            results = {name: vprlib.evaluate(model, bench, progress=False)
                       for name, bench in benchmarks.items()}
            ours = pd.concat([r.table() for r in results.values()]).set_index("benchmark")
            ours
            """
        ),
        md("## Ours vs paper"),
        code(
            """
            rows = []
            for name in ours.index:
                row = {"benchmark": name, "ours R@1": ours.loc[name, "R@1"], "ours R@5": ours.loc[name, "R@5"]}
                for k in (1, 5):
                    col = f"{name} R@{k}"
                    row[f"paper R@{k}"] = paper.loc[PAPER_MODEL, col] if col in paper else float("nan")
                rows.append(row)
            pd.DataFrame(rows).set_index("benchmark")
            """
        ),
        md(
            """
            `paper` is empty (NaN) for sets the paper did not report, such as the committed
            `gsv_sample`. With the released weights and the real benchmarks the numbers should
            come close to the paper's (resize and JPEG decoding differ slightly between
            libraries); this project has not yet checked it (README, "Results").
            """
        ),
        code(
            """
            weights_name = "/".join(Path(str(WEIGHTS)).parts[-2:])
            fig = plots.plot_recalls({name: r.recalls for name, r in results.items()},
                                     title=f"Recall@K of {weights_name}")
            plots.save_figure(fig, FIGURES / "03_recalls.png");
            """
        ),
    ]


# ------------------------------------------------------------------------------------------
# 04 retrieval results


def nb04() -> list:
    name = "04_retrieval_results.ipynb"
    return [
        *header(
            name,
            "04 · Retrieval results",
            """
            What a place-recognition model actually returns: descriptors for the database and
            the queries, nearest-neighbour search, recall@K, and a look at individual queries,
            the right and the wrong ones, on images and on a map.
            """,
        ),
        code(
            DATA_PARAMS
            + """
BENCHMARK = "gsv_sample"  # e.g. "pitts30k_test", "msls_val" on the full data
WEIGHTS = os.environ.get(
    "VPRLIB_WEIGHTS", "../checkpoints/02_convap/last.ckpt"
)  # written by notebook 02 (run it first), or a released name such as "resnet50_ConvAP_1024_2x2"
IMAGE_SIZE = None  # None: as WEIGHTS says (its checkpoint, else 320x320); or (H, W)
K = 5  # matches shown per query
"""
        ),
        code(
            """
            import numpy as np
            import torch

            import vprlib
            from vprlib import plots, widgets
            from vprlib.evaluate import evaluate_descriptors

            FIGURES.mkdir(parents=True, exist_ok=True)
            """
        ),
        code(TRAIN_IF_MISSING),
        code(
            """
            size = {} if IMAGE_SIZE is None else {"image_size": IMAGE_SIZE}
            model = vprlib.load_pretrained(WEIGHTS, **size)
            bench = vprlib.load_benchmark(BENCHMARK, root=BENCH_ROOT)
            bench
            """
        ),
        md(
            """
            ## Descriptors and search

            Every image becomes one L2-normalised vector; a query's matches are its nearest
            database vectors (faiss, exact L2 search, which on unit vectors ranks like cosine
            similarity).
            """
        ),
        code(
            """
            db_desc = vprlib.extract_descriptors(model, bench.db_paths, progress=False)
            q_desc = vprlib.extract_descriptors(model, bench.query_paths, progress=False)
            print("database", db_desc.shape, "queries", q_desc.shape)
            predictions = vprlib.search(db_desc, q_desc, k=25)
            recalls = vprlib.recall_at_k(predictions, bench.ground_truth)
            {f"R@{k}": round(100 * v, 1) for k, v in recalls.items()}
            """
        ),
        code(
            """
            fig = plots.plot_recalls({BENCHMARK: recalls}, title=f"Recall@K on {BENCHMARK}")
            plots.save_figure(fig, FIGURES / "04_recall_curve.png");
            """
        ),
        md(
            """
            ## Per-query results

            `evaluate_descriptors` keeps, for every query, its top-K database indices, the
            descriptor distances (squared L2: 0 = identical, 4 = opposite unit vectors) and
            which of them are true positives (within 25 m).
            """
        ),
        code(
            """
            results = evaluate_descriptors(db_desc, q_desc, bench)
            print(results.summary())
            """
        ),
        md(
            """
            ## Browse

            Query slider, K slider and an "only failures" toggle (queries whose top-1 is
            wrong). Each query (blue frame) is shown beside its top-K, green when the match
            is within 25 m, red otherwise, with the squared L2 descriptor distance; below, the same on a
            map.
            """
        ),
        code(
            """
            widgets.retrieval_browser(results, bench, k=K)
            """
        ),
        md("## A few queries: successes and failures"),
        code(
            """
            hits = np.flatnonzero(results.correct[:, 0])
            misses = np.flatnonzero(~results.correct[:, 0])
            shown = [*hits[:2], *misses[:2]]
            fig = plots.plot_retrieval_grid(results, shown, k=K)
            plots.save_figure(fig, FIGURES / "04_retrieval_examples.png");
            """
        ),
        md(
            """
            ## Failure summary

            For each query whose top-1 is wrong: how far (in metres, from the UTM coordinates)
            the wrongly retrieved place is, and at which rank the first true match appears.
            Near misses (tens of metres) are often the neighbouring place on the same street;
            far ones are look-alikes elsewhere. `first_correct_rank` is NaN when no true match
            is among the 25 retrieved; always so for a query with no database image within
            25 m (`num_positives` 0; the sample has 2), which can never succeed.
            """
        ),
        code(
            """
            failures = results.failures(k=1)
            print(f"{len(failures)} of {len(results.query_paths)} queries fail at top-1")
            failures[["query", "top1", "top1_distance", "top1_metres", "num_positives",
                      "first_correct_rank"]].head(10)
            """
        ),
        code(
            """
            failures[["top1_metres", "first_correct_rank"]].describe().round(1)
            """
        ),
        code(
            """
            fig = plots.plot_failure_distances(failures["top1_metres"])
            plots.save_figure(fig, FIGURES / "04_failure_distances.png");
            """
        ),
    ]


# ------------------------------------------------------------------------------------------
# 05 compare aggregators


def nb05() -> list:
    name = "05_compare_aggregators.ipynb"
    return [
        *header(
            name,
            "05 · Compare aggregators",
            """
            The aggregator turns the backbone's feature map into one descriptor. Here five of
            them are trained with the same backbone, data, budget and seed, then compared on
            recall, descriptor size and training time:

            - **convap**: 1x1 conv + adaptive average pool to 2x2 (this paper);
            - **gem**: generalised-mean pooling with a learnable exponent;
            - **mixvpr**: feature-mixer MLP blocks over the flattened map;
            - **netvlad**: soft assignment to learned cluster centres, residuals summed (the
              centres start from k-means of training features, as in the NetVLAD paper);
            - **avg**: plain global average pooling (the baseline).

            The CI defaults are tiny (ResNet18 without layer4, 64x64, a few steps) so all five
            train in a couple of minutes on a CPU; on the sample the ranking is noisy. Use
            `FULL_RUN = True` on a GPU with the real data for a meaningful comparison.
            """,
        ),
        code(
            DATA_PARAMS
            + """
FULL_RUN = False

if FULL_RUN:  # ResNet50 without layer4 (1024 channels), the literature's settings
    BACKBONE, PRETRAINED, LAYERS_TO_CROP, IMAGE_SIZE = "resnet50", True, [4], (320, 320)
    LAYERS_TO_FREEZE = 2
    AGGREGATORS = {  # name -> agg_config (backbone channels come from the backbone)
        "convap": {"out_channels": 1024, "s1": 2, "s2": 2},  # 4096-d
        "gem": {},  # 1024-d
        "mixvpr": {"out_channels": 1024, "out_rows": 4, "mix_depth": 4},  # 4096-d
        "netvlad": {"clusters": 64, "reduce_dim": 256},  # 16384-d
        "avg": {},  # 1024-d
    }
    # 10 epochs each, a third of the paper's 30: five runs of ~8 min on one H200
    PLACES_PER_BATCH, IMG_PER_PLACE, EPOCHS, MAX_STEPS_PER_EPOCH = 100, 4, 10, None
    OPTIMIZER, LR, WEIGHT_DECAY, WARMUP_STEPS, AUGMENT = "sgd", 0.05, 1e-3, 650, True
    VAL = "pitts30k_val"
else:  # tiny, from scratch (every layer trains)
    BACKBONE, PRETRAINED, LAYERS_TO_CROP, IMAGE_SIZE = "resnet18", False, [4], (64, 64)
    LAYERS_TO_FREEZE = -1
    AGGREGATORS = {
        "convap": {"out_channels": 128, "s1": 2, "s2": 2},
        "gem": {},
        "mixvpr": {"out_channels": 128, "out_rows": 4, "mix_depth": 2},
        "netvlad": {"clusters": 16},
        "avg": {},
    }
    PLACES_PER_BATCH, IMG_PER_PLACE, EPOCHS, MAX_STEPS_PER_EPOCH = 16, 4, 3, None
    OPTIMIZER, LR, WEIGHT_DECAY, WARMUP_STEPS, AUGMENT = "adamw", 1e-3, 0.0, 4, False
    VAL = "gsv_sample"
"""
        ),
        code(
            """
            import time

            import pandas as pd
            import torch

            import vprlib
            from vprlib import plots
            from vprlib.models import feature_map_size, init_netvlad

            FIGURES.mkdir(parents=True, exist_ok=True)
            train_ds = vprlib.GSVCitiesDataset(
                GSV_ROOT, img_per_place=IMG_PER_PLACE, min_img_per_place=IMG_PER_PLACE,
                image_size=IMAGE_SIZE, augment=AUGMENT,
            )
            val = vprlib.load_benchmark(VAL, root=BENCH_ROOT)
            print(f"train: {len(train_ds)} places; val: {val!r}")
            """
        ),
        md(
            """
            ## Train each aggregator with the same budget

            Same seed, same batches, same schedule; only the aggregator differs. MixVPR needs
            the feature-map size, which depends on the image size.
            """
        ),
        code(
            """
            rows, histories = [], {}
            for agg, agg_config in AGGREGATORS.items():
                config = dict(agg_config)
                if agg == "mixvpr":
                    config["in_h"], config["in_w"] = feature_map_size(*IMAGE_SIZE, LAYERS_TO_CROP)
                torch.manual_seed(0)
                model = vprlib.VPRModel(
                    backbone=BACKBONE, pretrained=PRETRAINED, layers_to_freeze=LAYERS_TO_FREEZE,
                    layers_to_crop=LAYERS_TO_CROP, agg=agg, agg_config=config,
                )
                model.preprocess = {"image_size": IMAGE_SIZE}
                start = time.perf_counter()
                if agg == "netvlad":  # k-means of local features of 32 training places
                    init_netvlad(model, torch.cat([train_ds[i][0] for i in range(32)]))
                histories[agg] = vprlib.fit(
                    model, train_ds, epochs=EPOCHS, places_per_batch=PLACES_PER_BATCH,
                    optimizer=OPTIMIZER, lr=LR, weight_decay=WEIGHT_DECAY,
                    warmup_steps=WARMUP_STEPS, max_steps_per_epoch=MAX_STEPS_PER_EPOCH,
                    seed=0, progress=False,
                )
                train_s = time.perf_counter() - start
                res = vprlib.evaluate(model, val, progress=False)
                rows.append({
                    "aggregator": agg,
                    **{f"R@{k}": round(100 * res.recalls[k], 1) for k in (1, 5, 10)},
                    "descriptor_dim": model.descriptor_dim,
                    "train_s": round(train_s, 1),
                })
                print(f"{agg:>8} ({model.descriptor_dim}-d, trained in {train_s:.0f} s): "
                      f"R@1 {100 * res.recalls[1]:.1f}  R@5 {100 * res.recalls[5]:.1f}")
            """
        ),
        md("## Results"),
        code(
            """
            table = pd.DataFrame(rows)
            table
            """
        ),
        code(
            """
            fig = plots.plot_compare(
                table, title=f"{len(table)} aggregators, same training budget, evaluated on {val.name}")
            plots.save_figure(fig, FIGURES / "05_compare_aggregators.png");
            """
        ),
        md(
            """
            Read the tiny-run numbers as a smoke test, not a ranking: a few steps on a few
            hundred synthetic images. In the literature, with ResNet50 at 320x320 on
            GSV-Cities, Conv-AP and MixVPR clearly beat GeM and average pooling, and NetVLAD
            sits between them at a much larger descriptor size.
            """
        ),
    ]


NOTEBOOKS = {
    "01_explore_dataset.ipynb": nb01,
    "02_train_convap.ipynb": nb02,
    "03_pretrained_weights.ipynb": nb03,
    "04_retrieval_results.ipynb": nb04,
    "05_compare_aggregators.ipynb": nb05,
}


def parameters_first(cells: list) -> list:
    """Move the parameters cell (the one holding DATA_ROOT) right after the title and tag it
    "parameters": the first code cell a reader edits, and the one papermill replaces."""
    (index,) = [i for i, c in enumerate(cells) if "DATA_ROOT = Path(" in c.source]
    params = cells.pop(index)
    params.metadata["tags"] = ["parameters"]
    return [cells[0], params, *cells[1:]]


def build(name: str):
    """The notebook object for file `name` (no outputs, Python 3 kernel)."""
    nb = nbformat.v4.new_notebook()
    nb.cells = parameters_first(NOTEBOOKS[name]())
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, cell in enumerate(nb.cells):
        cell.id = f"{Path(name).stem[:2]}-{i:02d}"  # stable ids: regenerating gives no diff
    nbformat.validate(nb)
    return nb


def main(argv: list[str]) -> int:
    names = argv or list(NOTEBOOKS)
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise SystemExit(f"unknown notebook(s) {unknown}; known: {list(NOTEBOOKS)}")
    for name in names:
        atomic_write_text(HERE / name, nbformat.writes(build(name)) + "\n")
        print(f"wrote notebooks/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
