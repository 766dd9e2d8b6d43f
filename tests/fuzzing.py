"""Knobs shared by the property-based tests (hypothesis).

Each property has two tests: a quick one in the normal suite (`quick_settings`: a few hundred examples,
derandomized so the suite is reproducible) and a long one marked `@pytest.mark.fuzz` (deselected by
default; `make fuzz` runs them) that draws fresh random examples:

    make fuzz                         # FUZZ_EXAMPLES (default 2000) examples per fuzz test
    make fuzz FUZZ_SECONDS=300        # each fuzz test keeps drawing new examples for 5 minutes
    make fuzz FUZZ_MINUTES=30         # 30 minutes in all, split evenly over the fuzz tests

Usage:

    @pytest.mark.fuzz
    def test_x_fuzz():
        campaign(fuzz_settings()(given(strategy)(check)))
"""
import os
import time

from hypothesis import HealthCheck, settings

FUZZ_EXAMPLES = int(os.environ.get("NPGPT_FUZZ_EXAMPLES", "2000"))
FUZZ_SECONDS = float(os.environ.get("NPGPT_FUZZ_SECONDS", "0"))

# generated inputs are files and byte strings: slow-ish and large by hypothesis's standards, on purpose
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def quick_settings(max_examples: int = 200) -> settings:
    """For the normal suite: the same examples every run, no example database written to disk."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=_QUIET)


def fuzz_settings() -> settings:
    """For @pytest.mark.fuzz tests: NPGPT_FUZZ_EXAMPLES random examples per round."""
    return settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=_QUIET)


def campaign(test) -> int:
    """Run a @given test in rounds (each with a new random seed) until NPGPT_FUZZ_SECONDS have passed;
    one round when it is 0. Returns the number of rounds."""
    stop, rounds = time.monotonic() + FUZZ_SECONDS, 0
    while True:
        test()
        rounds += 1
        if time.monotonic() >= stop:
            return rounds
