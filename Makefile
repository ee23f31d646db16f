# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
# Both install everything first: the one system library open3d needs, then a virtualenv in .venv.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test install sysdeps bench clean

demo: install
	dvc repro
	@echo
	@echo "Done. Look at the results:"
	@echo "  data/raw/street/          the rendered default scene (video.mp4, queries/, transforms.json, hdmap.geojson, points.ply)"
	@echo "  data/ingest/street/       keyframes (images/, queries/), manifest.csv, cameras.json, capture.json, metrics.json"
	@echo "  data/sfm/street/          COLMAP model/, poses.csv, sparse.ply, alignment.json, per_image.csv, metrics.json (errors vs ground truth)"
	@echo "  data/hdmap/street/        overlay.png (the map on the orthomosaic), hdmap.geojson, map.osm (Lanelet2), rasters.npz, metrics.json"
	@echo "  data/recon/street/        mvs/ (fused.ply, mesh.ply), nerf/ (field.pt, renders/, mesh.ply), undistorted/transforms.json (nerfstudio), metrics.json"
	@echo "  dvc metrics show          every stage's numbers;  dvc plots show  per-frame series;  dvc dag  the pipeline"

test: install
	$(BIN)/python -m pytest

install: sysdeps $(STAMP)

# open3d links libusb-1.0 (Debian package libusb-1.0-0). Installed as root when missing; otherwise we
# say exactly what to install.
sysdeps:
	@if ! ldconfig -p | grep -q 'libusb-1.0.so.0'; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing libusb-1.0-0 (needed by open3d)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libusb-1.0-0 >/dev/null; \
	  else \
	    echo "open3d needs the system library libusb-1.0: run 'sudo apt-get install libusb-1.0-0', then make again"; \
	    exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11 is required (python3.11 or python3 on PATH)"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "Python 3.11 is required, found $$($(PYTHON) --version)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

bench: install
	$(BIN)/python bench/synth.py
	$(BIN)/python bench/dvc_noop.py
	$(BIN)/python bench/sfm.py

# Pipeline outputs: only what git ignores, so the committed metrics.json and per_image.csv files stay.
clean:
	rm -rf $(VENV) .dvc/cache .dvc/tmp
	git clean -fdXq data
