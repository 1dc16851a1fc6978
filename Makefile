# Two entry points (see README): `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEMO_CT := Testing/Data/totalseg-example-ct/ct
DEMO_LABELS := Testing/Data/totalseg-example-ct/labels/labels_on_ct_grid.nrrd
DEMO_OUT ?= out/demo
TRAIN_CT := Testing/Data/totalseg-example-ct/nifti

.PHONY: test demo screenshots demo-model demo-model-stage2 evaluate bench bench-encoder bench-engine bench-volume bench-dicom-seg bench-batch bench-gpu lint clean

$(STAMP): pyproject.toml constraints-ci.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints-ci.txt -e '.[test]'
	touch $@

# The real light-the-torch and its pip (torch_install.TOOLS), for the test that runs them offline.
TOOL_WHEELS := $(VENV)/tool-wheels
$(TOOL_WHEELS)/.done: $(STAMP) SAMMed2DSegment/SAMMed2DSegmentLib/torch_install.py
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: -d $(TOOL_WHEELS) \
		$$($(PY) -c "from SAMMed2DSegmentLib.torch_install import TOOLS; print(*TOOLS)")
	touch $@

test: $(STAMP) $(TOOL_WHEELS)/.done
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest Testing

# Issue 27's table: every precision this CPU offers (s/slice, share of the matmul peak, agreement with fp32),
# then the cold start (stages, and the engine process's first mask against torch import + encode + decode).
bench: $(STAMP)
	$(PY) benchmarks/bench_precisions.py --device cpu
	$(PY) benchmarks/cold_start.py

# The encoder against the golden output, pre-encoding the bundled CT, fine-tuning samples/s.
bench-encoder: $(STAMP)
	$(PY) benchmarks/bench_encoder.py

bench-engine: $(STAMP)
	$(PY) benchmarks/bench_engine.py

bench-volume: $(STAMP)
	$(PY) benchmarks/bench_volume.py

bench-dicom-seg: $(STAMP)
	$(PY) benchmarks/bench_dicom_seg.py

bench-batch: $(STAMP)
	$(PY) benchmarks/bench_batch.py

# Needs CUDA (refuses in one line without it); `--device cpu --quick` is its dry run.
bench-gpu: $(STAMP)
	$(PY) benchmarks/bench_precisions.py

# The main job on the bundled DICOM CT with the bundled demo model: one include point in the liver,
# propagated through every slice; writes the .seg.nrrd, a DICOM-SEG, the report and a PNG overview.
demo: $(STAMP)
	mkdir -p $(DEMO_OUT)
	rm -f $(DEMO_OUT)/liver.seg.nrrd $(DEMO_OUT)/liver-seg.dcm $(DEMO_OUT)/report.json $(DEMO_OUT)/overview.png
	$(PY) -P -m SAMMed2DSegmentLib segment --volume $(DEMO_CT) --include demo/liver-point.mrk.json \
		--segment-name liver --out $(DEMO_OUT)/liver.seg.nrrd --dicom-seg $(DEMO_OUT)/liver-seg.dcm \
		--report $(DEMO_OUT)/report.json --quiet
	$(PY) demo/summarize.py --volume $(DEMO_CT) --segmentation $(DEMO_OUT)/liver.seg.nrrd --segment liver \
		--report $(DEMO_OUT)/report.json --labels $(DEMO_LABELS) --label-value 5 --png $(DEMO_OUT)/overview.png

# The README's screenshots, drawn by Slicer's own slice views (offscreen, slicer-core) from the bundled CT and
# demo model: the liver segmented from include and exclude points and propagated, the three views, and a
# before/after of "Propagate from here". Writes the PNGs in Resources/Screenshots/ (committed).
screenshots: $(STAMP)
	$(PY) Resources/Screenshots/make_screenshots.py --out-dir Resources/Screenshots

# Re-train the demo model as shipped, in two stages (see its model card). Stage 1 (about 37 minutes on 2 quiet
# cores of a CPU with AVX512-BF16 or AMX; bf16 is emulated and impractically slow on other CPUs) trains the
# network from scratch; stage 2 (fp32, about 2.5 minutes) retrains its decoder and encoder adapters so that
# every multimask output covers the whole structure and corrective clicks are followed. The result goes to
# build/demo-model/ and is compared with the bundled file: byte-identical on the CPU it was trained on with 2
# threads; another CPU's kernels may give other bytes (see the model card). Replacing the bundled file (and
# its SHA-256 in the registry) is a deliberate second step. `make demo-model-stage2` runs stage 2 alone from an
# existing stage 1 file.
BUNDLED_DEMO := SAMMed2DSegment/Resources/Models/sammed2d_demo_small.safetensors
DEMO_MODEL_DIR := build/demo-model
STAGE1_DEMO := $(DEMO_MODEL_DIR)/stage1.safetensors
TRAINED_DEMO := $(DEMO_MODEL_DIR)/sammed2d_demo_small.safetensors
TRAIN_PAIR := --image $(TRAIN_CT)/example_ct_sm.nii.gz --labels $(TRAIN_CT)/example_seg.nii.gz
# A second validation patient, never trained on: it takes part in choosing stage 2's checkpoint.
MSD := Testing/Data/msd-spleen-8
VALIDATION_PAIR := --val-image $(MSD)/spleen_8_ct.nii.gz --val-labels $(MSD)/spleen_8_label.nii.gz
demo-model: $(STAMP)
	mkdir -p $(DEMO_MODEL_DIR)
	$(PY) -P -m SAMMed2DSegmentLib finetune $(TRAIN_PAIR) --out-dir $(DEMO_MODEL_DIR)/stage1 --steps 4000 \
		--eval-every 250 --seed 0 --threads 2 --precision bf16 --resume --export $(STAGE1_DEMO)
	$(MAKE) demo-model-stage2

demo-model-stage2: $(STAMP)
	test -f $(STAGE1_DEMO) || { echo "$(STAGE1_DEMO) is missing: run make demo-model"; exit 1; }
	$(PY) -P -m SAMMed2DSegmentLib finetune $(TRAIN_PAIR) $(VALIDATION_PAIR) --out-dir $(DEMO_MODEL_DIR)/stage2 \
		--init $(STAGE1_DEMO) --freeze-encoder --all-tokens --size-exponent 0.75 --prompt-mix 0.6 0.2 0.2 \
		--correction-probability 0.9 --correction-rounds 5 --lr 3e-4 --steps 100 --eval-every 50 --seed 0 \
		--threads 2 --precision fp32 --resume --export $(TRAINED_DEMO)
	sha256sum $(TRAINED_DEMO) $(BUNDLED_DEMO)
	cmp $(TRAINED_DEMO) $(BUNDLED_DEMO) && echo "identical to the bundled model"

# The interactive protocols for liver, spleen, kidneys and stomach on both bundled CTs: the 2-D one (box + 5
# corrective clicks per slice, propagation, region-grow baseline) and the CVPR 2025 challenge's (box on the
# middle slice, propagation, 5 clicks in 3-D; DSC/NSD/AUC); two tables (JSON per case in out/evaluate/).
evaluate: $(STAMP)
	$(PY) benchmarks/evaluate_all.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
