"""The suite's fixtures: the real PostgreSQL (checked reachable, stopped and started for the
fault tests), the real ``pgws-relay`` started per test, a headless Chromium per module. The
helpers they use are in :mod:`tests.helpers`."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator

import pytest

from tests.helpers import (
    CHROMEDRIVER,
    CHROMIUM,
    CLUSTER,
    RelayProcess,
    browser_missing,
    check_postgres,
    postgres,
    relay_env,
)


@pytest.fixture(scope="module", autouse=True)
def _postgres_reachable(request: pytest.FixtureRequest) -> None:
    """Every test but the unit tree needs PostgreSQL: fail early, with its address."""
    if "unit" not in request.path.relative_to(request.config.rootpath).parts[:2]:
        check_postgres()


@pytest.fixture
def postgres_control() -> Iterator[Callable[[str], None]]:
    """:func:`postgres` for a test; the server is running again after it, whatever happened.

    CI must prove the fault tests, so there a missing cluster fails them; elsewhere (a remote
    test database, say) they are skipped.
    """
    if CLUSTER is None:
        message = "no local PostgreSQL cluster to stop and start (pg_ctlcluster)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield postgres
    finally:
        subprocess.run([*CLUSTER, "start"], timeout=120, stdin=subprocess.DEVNULL,
                       capture_output=True)  # Already running: a harmless error.
        check_postgres()


@pytest.fixture
def start_relay() -> Iterator[Callable[..., RelayProcess]]:
    """Start a relay with ``relay_env(**overrides)``; it is killed after the test."""
    started: list[RelayProcess] = []

    def start(args: list[str] | None = None, wait: bool = True, **overrides: str
              ) -> RelayProcess:
        relay = RelayProcess(relay_env(**overrides), args)
        started.append(relay)
        if wait:
            relay.wait_ready()
        return relay

    yield start
    for relay in started:
        relay.stop()


@pytest.fixture
def relay(start_relay: Callable[..., RelayProcess]) -> RelayProcess:
    return start_relay()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """One headless Chromium for the module; each test loads the page afresh."""
    missing = browser_missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests need a browser: {missing}")
        pytest.skip(f"browser tests need a browser: {missing}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,960", "--lang=en-GB",
                     "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
