"""Fine-tuning (`python -m SAMMed2DSegmentLib finetune`), one concept per module, in the order a step uses
them: `settings` (the run's options), `data` (labelled volumes → slices, held-out band), `batches`
(augmentation and intensity mapping), `prompts` (first prompts and corrective clicks), `step` (decoder rounds
and losses), `validation` (the score that picks the best step), `state` (resumable state, schedule, export),
`training` (the loop); the command line is `commands/finetune.py`."""
