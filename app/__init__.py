"""FindLady verification service: REST API, job runner, blob store and audit trail.

Stands on ``findlady_core`` for the science; see DESIGN.md sections 6 and 7.
"""
