"""An example of a model defined outside megalith: `--model examples.custom_model.tiny_lm:SPEC`."""
