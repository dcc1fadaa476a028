# qvla: the README's commands. Every target sets up first (idempotent: seconds when nothing changed).
.PHONY: setup test test-fast demo calibration-demo lint clean

VENV ?= .venv
PY := $(VENV)/bin/python

setup:
	@scripts/setup.sh

# the whole suite (what CI runs): fast unit tests, ROS tests over real DDS, MuJoCo sim tests, slow ones
test: setup
	@$(PY) -m pytest -q

# quick loop while developing: leaves out the tests marked slow
test-fast: setup
	@$(PY) -m pytest -q -m "not slow"

# the main job: the simulated rig driven by the committed quantized policy over ROS 2
# (options through ARGS, e.g. make demo ARGS="--monitor --episodes 10")
demo: setup
	@$(PY) -m qvla_ros.demo $(ARGS)

# the calibration loop in simulation over ROS 2: record demonstrations -> Calibrate action -> hot reload -> closed loop
calibration-demo: setup
	@$(PY) -m qvla_ros.calibration_demo

lint: setup
	@$(VENV)/bin/ruff check src tests bench launch
	@$(VENV)/bin/ruff format --check src tests bench launch

clean:
	rm -rf build install log .pytest_cache .ruff_cache
