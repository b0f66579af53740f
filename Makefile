# The two set-up commands: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= results/demo_data

.PHONY: venv demo test clean-demo

venv: $(STAMP)

# Reinstall only when a requirements file changed since the last install.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q -n 2 --durations=15 tests

demo: venv
	bash scripts/demo.sh $(PY) $(DEMO_DIR)

# The demo's pruning study with its controls: the dense twin recovered like every variant (BatchNorm recalibrated,
# STUDY_STEPS fine-tuning steps of the training recipe, distilled from the dense network) and the Random criterion,
# Magnitude L2 and Taylor at 30/50/70%, and per criterion a budget of 2 GMACs met by a per-part plan and by the
# uniform ratio of equal GMACs; INT8 rows (each beside its float32 graph's row) for the dense twin and the L2
# plan; each run with two seeds (mean and spread). Needs `make demo` first (its network and data); a retrained
# network needs `make study-demo STUDY_FLAGS=--overwrite`.
STUDY_WEIGHTS ?= results/runs/demo/best.pth
STUDY_OUTPUT ?= results
STUDY_FLAGS ?=
STUDY_STEPS ?= 40
.PHONY: study-demo
study-demo: venv
	$(PY) study.py --state_dict $(STUDY_WEIGHTS) --data $(DEMO_DIR)/train --val_data $(DEMO_DIR)/val \
	    --test_data $(DEMO_DIR)/test --importance_type Magnitude Taylor Random --p_value 2 \
	    --pruning_ratio 30 50 70 --target_gmacs 2 --int8 dense_finetuned magnitude_l2_2gmacs_budgeted_1step \
	    --seeds 1 2 --bn_recalibrate 20 --finetune_steps $(STUDY_STEPS) --finetune_val_every 20 \
	    --distill 1 --crop_size 96 --calib_batches 1 \
	    --measure_size 128 --latency_runs 15 --workers 2 --quiet --name demo_study_seeds \
	    --output_dir $(STUDY_OUTPUT) $(STUDY_FLAGS)

# docs/results.md, and the manual's figures in imgs/, from the outputs a maintainer chose (RESULTS_RUN, default results/;
# its training runs RESULTS_RUNS; the recovery lever table from RESULTS_RUN/levers/studies when a maintainer ran one,
# one study.py --name per setting there):
# every measured number the manual cites, each block stamped with its command, date, machine and commit.
RESULTS_RUN ?= results
RESULTS_RUNS ?= demo
.PHONY: results
results: venv
	$(PY) scripts/render_results.py --results $(RESULTS_RUN) --output docs/results.md --figures imgs --runs $(RESULTS_RUNS) \
	    $(if $(wildcard $(RESULTS_RUN)/levers/studies),--levers $(RESULTS_RUN)/levers)
