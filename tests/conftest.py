import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One cache (built-in public data, classifiers, FID statistics) shared by the whole session."""
    return tmp_path_factory.mktemp("privimage-cache")
