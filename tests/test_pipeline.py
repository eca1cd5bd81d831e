"""Pipeline schedules against their published definitions, and the pipeline runtimes against jax.jit."""

import itertools

import pytest

from autoplan._src import pipeline as pl

CASES = [("gpipe", s, b, 1) for s, b in itertools.product((1, 2, 3, 4), (1, 2, 4, 8))] + \
        [("1f1b", s, b, 1) for s, b in itertools.product((1, 2, 3, 4), (1, 2, 4, 8))] + \
        [("interleaved", s, b, v) for s, b, v in itertools.product((2, 4), (4, 8), (2, 3, 4)) if b % s == 0]


def _schedule(name, stages, microbatches, virtual):
    return pl.schedule(name, stages=stages, microbatches=microbatches, virtual=virtual if virtual > 1 else 2)


@pytest.mark.parametrize("name,stages,microbatches,virtual", CASES)
def test_bubble_matches_published_formula(name, stages, microbatches, virtual):
    # GPipe / 1F1B: (S-1)/(B+S-1) (GPipe paper; PipeDream-Flush has the same bubble);
    # interleaved: Megatron-LM SC'21 eq. for bubble time (p-1)/(v m) of ideal = (S-1)/(vB+S-1) of the step.
    s = _schedule(name, stages, microbatches, virtual)
    assert s.bubble_fraction == pytest.approx((stages - 1) / (s.virtual * microbatches + stages - 1), abs=1e-12)
    assert s.bubble_fraction == pytest.approx(pl.bubble_formula(name, stages, microbatches, s.virtual), abs=1e-12)


@pytest.mark.parametrize("name,stages,microbatches,virtual", CASES)
def test_table_is_a_valid_pipeline(name, stages, microbatches, virtual):
    s = _schedule(name, stages, microbatches, virtual)
    at = {(t.kind, t.microbatch, t.chunk * stages + t.stage): t.tick for t in s.tasks}
    last = stages * s.virtual - 1
    # Every (virtual stage, microbatch) runs F once and B once.
    assert len(s.tasks) == 2 * stages * s.virtual * microbatches == len(at)
    for m in range(microbatches):
        for vs in range(last + 1):
            assert at[("F", m, vs)] < at[("B", m, vs)]  # F before B
            if vs > 0:
                assert at[("F", m, vs - 1)] < at[("F", m, vs)]  # activations flow forward
            if vs < last:
                assert at[("B", m, vs + 1)] < at[("B", m, vs)]  # cotangents flow backward
    # One task per stage per tick.
    assert len({(t.stage, t.tick) for t in s.tasks}) == len(s.tasks)


@pytest.mark.parametrize("stages,microbatches", [(2, 4), (4, 4), (4, 8), (3, 7)])
def test_activations_in_flight(stages, microbatches):
    gpipe = pl.schedule("gpipe", stages=stages, microbatches=microbatches)
    one_f = pl.schedule("1f1b", stages=stages, microbatches=microbatches)
    for s in range(stages):
        assert gpipe.in_flight(s) == microbatches
        assert one_f.in_flight(s) == min(stages - s, microbatches)


def test_schedule_prints(capsys):
    s = pl.schedule("interleaved", stages=2, microbatches=4, virtual=2)
    print(s)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "interleaved: 2 stages, 4 microbatches, 2 chunks per stage, 18 ticks, bubble 11.1%"
    assert out.splitlines()[1].split()[3:7] == ["F0a", "F1a", "F0b", "F1b"]  # chunk a of mb 0, 1 then chunk b


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'"):
        pl.schedule("zb", stages=2, microbatches=2)
    with pytest.raises(ValueError, match="not a multiple of 4 stages"):
        pl.schedule("interleaved", stages=4, microbatches=6)
