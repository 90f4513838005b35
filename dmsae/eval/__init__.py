"""Evaluation maths, as pure functions of tensors the stages load: reconstruction and downstream loss
(`reconstruction`), equal-L0 comparison (`l0match`), sparse probing (`probing`, its tasks in `tasks`),
feature absorption (`absorption`), the logistic-regression solver the probes share (`logistic`), paired
bootstrap intervals over seeds (`stats`) and the cross-seed overlap of dictionaries (`overlap`)."""
