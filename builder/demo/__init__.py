"""``python -m builder.demo`` (what ``make demo`` runs): EdgeFleet's main job as named stages.

``stages`` (the stage list and the runner), ``fleet`` (deploy to three agents), ``loop`` (the
re-compression loop reacting to a slowed-down device), ``output`` (the output folder) and
``child_processes`` (the serve and agent subprocesses the stages start). Nothing in the product
imports this package: the demo uses the product, never the other way round.
"""
