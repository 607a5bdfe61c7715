"""ResetPolicy: one internal spelling, the accepted ones normalised, the recorded ones unchanged."""
import json

import pytest

from mgg_core.reasons import ResetPolicy


def test_reset_policy_normalises_accepted_spellings_and_keeps_recorded_ones():
    assert ResetPolicy.parse("per_domain") is ResetPolicy.parse("domain") is ResetPolicy.PER_DOMAIN
    assert ResetPolicy.parse("never") is ResetPolicy.NEVER
    assert ResetPolicy.parse(ResetPolicy.NEVER) is ResetPolicy.NEVER
    # what StreamSpec.to_dict and results.json's "reset_policy" have always recorded
    assert json.dumps({"reset": ResetPolicy.PER_DOMAIN}) == '{"reset": "per_domain"}'
    assert [p.results_name for p in ResetPolicy] == ["domain", "never"]
    for bad in ("per-domain", "continual", "", "every"):
        with pytest.raises(ValueError, match="reset policy"):
            ResetPolicy.parse(bad)
