"""Site adaptation: the data an adapter learns from, the adapter's card, and the guard before it
drafts live studies.

* `corpus`: public, openly licensed case collections as a training manifest (licence per record);
* `pairs`: the node's own drafted studies with their signed reports (`--from-node`);
* `scrub`: identifiers taken out of report text, with a count of what was removed;
* `split`: the held-out studies, chosen by patient; `settings`: what a training run is given;
* `card`: what an adapter was trained on and how it scored, read by the worker and by `promote`;
* `promote`: `cxr-node model promote`, which refuses an adapter worse than the model in service.

The training loop itself needs torch and lives with the worker code (`workers/training.py`).
"""
