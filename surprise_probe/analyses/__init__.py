"""Analyses above the probes and interventions: the on/off-policy gap, cached intention, the token view."""
