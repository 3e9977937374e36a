"""Fixtures shared by the test packages (the packages' tests and tests/ alike)."""

pytest_plugins = ["tests.support.engine_fixtures", "tests.support.logging_fixtures", "tests.support.word_requests"]
