# medge — two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test peers engines bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[trainer,dev,plots,capture]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medge demo

test: $(STAMP) peers
	$(PY) -m pytest -q

# The real peers the tests drive, as program:Debian-package (tests/conftest.py PEERS is the same list).
# Looks in the system's bin folders only (pynetdicom puts a Python storescu/storescp/echoscu into .venv/bin).
# Installs what is missing with apt-get as root or via passwordless sudo; otherwise says which tests
# will skip. Under CI=true (.ci/run) a peer still missing is an error. Nothing to do: no apt-get at all.
# Packages whose install starts a system service (prometheus, orthanc) have it stopped and disabled
# again: the tests start their own instances on ephemeral ports.
PEERS := storescu:dcmtk storescp:dcmtk echoscu:dcmtk dciodvfy:dicom3tools promtool:prometheus \
	prometheus:prometheus Orthanc:orthanc systemd-analyze:systemd openssl:openssl

peers:
	@have() { for d in /usr/bin /usr/sbin /bin /sbin /usr/local/bin /usr/local/sbin; do [ -x "$$d/$$1" ] && return 0; done; return 1; }; \
	missing() { for pair in $(PEERS); do have "$${pair%%:*}" || echo "$${pair##*:}"; done | sort -u | tr '\n' ' '; }; \
	need=$$(missing); [ -z "$$need" ] && exit 0; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi; \
	if [ "$$sudo" != none ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "make peers: installing $$need"; \
	  apt="$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends"; \
	  $$sudo apt-get update -q && { $$apt $$need || for p in $$need; do $$apt "$$p" || true; done; }; \
	  if [ -d /run/systemd/system ]; then for p in prometheus orthanc; do \
	    case " $$need " in *" $$p "*) $$sudo systemctl disable --now "$$p.service" >/dev/null 2>&1 || true;; esac; \
	  done; fi; \
	else \
	  echo "make peers: cannot install (needs apt-get and root or passwordless sudo)"; \
	fi; \
	still=$$(missing); [ -z "$$still" ] && exit 0; \
	echo "make peers: missing Debian packages: $$still"; \
	for pair in $(PEERS); do have "$${pair%%:*}" || echo "  $${pair%%:*} ($${pair##*:}): its tests will skip"; done; \
	case "$$(echo "$${CI:-}" | tr A-Z a-z)" in 1|true|yes)  echo "make peers: CI=true needs every peer; install them first"; exit 1;; esac

# Rebuild the bundled engines from scratch (train, export, quantize); see docs/models/.
engines: $(STAMP)
	$(PY) -m trainer.reproduce --out engines

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .medge build *.egg-info
