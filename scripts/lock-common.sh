# Shared by scripts/test, scripts/relock and scripts/canary (sourced, not run).
# The extras every test stack installs: what the suite exercises (the runtime, export, server, Ray, signing,
# the docs site).
EXTRAS="export,test,serve,ray,sign,docs"
STACKS="latest transformers4"

venv_of() {  # the venv folder of a stack
    case "$1" in latest) echo .venv ;; *) echo ".venv-$1" ;; esac
}

install_lock() {  # install_lock VENV LOCK: exactly the lock's versions
    python3 -m venv "$1" && "$1/bin/pip" install -q --disable-pip-version-check -r "$2"
}

install_locked() {  # install_locked VENV LOCK: the lock, then spexport itself (editable, nothing more)
    install_lock "$1" "$2" \
        && "$1/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e . \
        && "$1/bin/pip" check
}
