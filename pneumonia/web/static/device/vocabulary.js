// The product's one vocabulary (pneumonia/serving/outcomes.py), as the page compares and shows it:
// tests/test_device_modules.py holds these tables equal to the Python enums.

// What became of one file: Outcome.
export const Outcome = Object.freeze({ SCREENED: "screened", REFUSED: "refused", FAILED: "failed" });

// The out-of-distribution gate's word on one image: GateVerdict.
export const GateVerdict = Object.freeze({ OK: "ok", UNUSUAL: "unusual", REJECTED: "rejected" });
