# Two commands: `make run` starts the box on the dev ports with its data in ./data; `make test` runs everything.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: run test lint unit peers bench clean image image-pi image-test image-deps

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

run: $(STAMP)
	@mkdir -p data
	$(BIN)/letterbox --data ./data serve --listen 127.0.0.1 --port-offset 10000

peers:
	@bash .ci/install-peers

lint: $(STAMP)
	$(BIN)/ruff check appliance web tests bench
	$(BIN)/mypy

# Four workers on two cores: most tests wait on sockets and peers, not the CPU; one file per worker keeps
# its module fixtures together (tests/conftest.py gives each worker its own ports).
# Bytecode is written even where the environment says PYTHONDONTWRITEBYTECODE: the suite starts hundreds of
# `letterbox` processes, and without .pyc files each compiles the appliance again (test_cli.py: 111 -> 90 s
# of CPU under load), as each pytest worker rewrites every test module's asserts again.
test: $(STAMP) peers lint
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/pytest -n 4 --dist loadfile

# Pure and fast: no Debian peers, no subprocesses.
unit: $(STAMP)
	$(BIN)/pytest tests/unit

# Issue 19's table first: Letterbox next to a private Postfix + Dovecot (bench/side_by_side.py, 3 interleaved
# rounds per size, niced; each IMAP command stopped at 120 s and shown as "> 120 s"). Then the benchmarks that
# table does not cover. bench/imap.py, smtp.py, pop3.py and deliver.py (covered) still run on their own.
BENCH_SIZES ?= 1000,10000,100000
BENCH_LIBS := bench/__init__.py bench/benchbox.py bench/corpus.py bench/peers.py bench/side_by_side.py
BENCH_COVERED := bench/imap.py bench/smtp.py bench/pop3.py bench/deliver.py
bench: $(STAMP) peers
	@echo "== bench.side_by_side"; nice -n 10 $(BIN)/python -m bench.side_by_side --sizes $(BENCH_SIZES)
	@for script in $(basename $(notdir $(filter-out $(BENCH_LIBS) $(BENCH_COVERED),$(wildcard bench/*.py)))); do \
		echo "== bench.$$script"; $(BIN)/python -m bench.$$script || exit 1; done

# Refresh docs/screenshots/ (the README's images): the end-to-end wizard test, writing there.
.PHONY: screenshots
screenshots: $(STAMP) peers
	UPDATE_SCREENSHOTS=1 $(BIN)/pytest -p no:cacheprovider tests/e2e/test_web_wizard.py tests/e2e/test_web_certificate.py \
		tests/e2e/test_backup_web.py tests/e2e/test_web_spam.py tests/e2e/test_console_running.py \
		tests/e2e/test_web_updates.py tests/e2e/test_lockout_web.py tests/e2e/test_web_settings.py

# The appliance images (image/README.md): Debian bookworm by mmdebstrap, Letterbox from this checkout's wheel.
# The Debian base is cached in /var/cache/letterbox-image keyed by the package list; outputs go to image/out/.
IMAGE_OUT := image/out
image-deps:
	@bash image/install-build-deps

# amd64 VM image: raw (Proxmox, KVM, dd to a disk), qcow2 (virt-manager/Proxmox), vmdk (VMware, VirtualBox), raw.xz.
image: $(STAMP) image-deps
	PYTHON=$(BIN)/python bash image/build.sh amd64 $(IMAGE_OUT) --formats raw,qcow2,vmdk,xz

# Raspberry Pi 4/5 (arm64, built under qemu-user): slow, a release job. Then what the Pi firmware would
# read is checked in the image file (tests/image/test_pi_image.py: device trees, config.txt, the initrd's
# SD drivers, apt's kernel pin), and its kernel and root file system are booted under qemu-system-aarch64
# -M virt to the wizard (the Pi firmware cannot be emulated).
image-pi: $(STAMP)
	@bash image/install-build-deps --arm64
	PYTHON=$(BIN)/python bash image/build.sh arm64 $(IMAGE_OUT) --formats raw,xz
	LETTERBOX_PI_IMAGE=$(IMAGE_OUT)/letterbox-arm64.img $(BIN)/pytest -p no:cacheprovider -v tests/image/test_pi_image.py
	$(BIN)/python -m tests.image.pi_virt $(IMAGE_OUT)/letterbox-arm64.img

# Build the amd64 image and boot it under qemu (TCG) from the host: wizard, mail in and out, reboot,
# updates. Two machines at once, one per module and worker (tests/image/conftest.py). Their disks are under
# the checkout's image/out/test/pytest: pytest's shared /tmp/pytest-of-USER keeps only its three newest
# runs, and other pytest runs on the machine would delete a running VM's folder.
image-test: $(STAMP) image-deps
	PYTHON=$(BIN)/python bash image/build.sh amd64 $(IMAGE_OUT)/test
	LETTERBOX_IMAGE=$(IMAGE_OUT)/test/letterbox-amd64.img $(BIN)/pytest -p no:cacheprovider -n 2 --dist loadfile \
		--basetemp=$(IMAGE_OUT)/test/pytest --durations=0 -v tests/image

# The update bundle of this checkout, for letterbox-update and the console's Updates page (and the image):
# dist/letterbox-bundle-VERSION-MACHINE.tar, the Letterbox wheel and every dependency's (appliance/bundle.py).
.PHONY: bundle
bundle: $(STAMP)
	$(BIN)/python -m appliance.bundle build --out dist

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
