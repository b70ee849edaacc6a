"""Training: LR schedule, loss scaling, batch arithmetic, FLOP model, and (later) the train loop."""
