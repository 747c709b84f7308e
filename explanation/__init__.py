"""Why a model says what it says: exact TreeSHAP contributions and the reason codes built from them."""
