"""The original study's snippets, run as written on top of lenetlab."""

from __future__ import annotations

import torch
from torch.optim import SGD, Adam
from torchmetrics import Accuracy

from lenetlab import MODEL_PATH, MODEL_SAVE_PATHS, LeNet5V1, make_dataloaders, train_model


def _tiny(loader, n):
    """The first n batches of a loader, as a list (a loader is only iterated)."""
    return [batch for _, batch in zip(range(n), loader)]


def test_original_snippets_run_unchanged(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_dataloader, val_dataloader, test_dataloader = make_dataloaders(data_dir=data_dir)
    assert len(train_dataloader.dataset) == 54_000 and len(test_dataloader.dataset) == 10_000
    assert train_dataloader.batch_size == 64
    train_dataloader, val_dataloader = _tiny(train_dataloader, 40), _tiny(val_dataloader, 20)
    MODEL_PATH.mkdir(parents=True, exist_ok=True)  # as the notebook did

    model_baseline = LeNet5V1()
    train_acc_baseline, val_acc_baseline = train_model(
        model=model_baseline,
        train_loader=train_dataloader,
        val_loader=val_dataloader,
        epochs=2,
        optimizer=Adam,
        accuracy=Accuracy(task='multiclass', num_classes=10)
    )
    assert len(train_acc_baseline) == 2 and len(val_acc_baseline) == 2
    assert val_acc_baseline[-1] > 0.5

    model_l2 = LeNet5V1()
    train_model(model=model_l2, train_loader=train_dataloader, val_loader=val_dataloader,
                epochs=1, optimizer=Adam, accuracy=Accuracy(task='multiclass', num_classes=10),
                weight_decay=0.01)
    model_batch_norm = LeNet5V1(use_batch_norm=True)
    model_dropout = LeNet5V1(use_dropout=True)

    torch.save(model_baseline.state_dict(), MODEL_SAVE_PATHS['baseline'])
    torch.save(model_dropout.state_dict(), MODEL_SAVE_PATHS['dropout'])
    torch.save(model_l2.state_dict(), MODEL_SAVE_PATHS['l2_regularization'])
    torch.save(model_l2.state_dict(), MODEL_PATH / "lenet5v1_l2_optimized.pth")
    torch.save(model_batch_norm.state_dict(), MODEL_SAVE_PATHS['batch_norm'])

    model_baseline_loaded = LeNet5V1()
    model_baseline_loaded.load_state_dict(torch.load(MODEL_SAVE_PATHS['baseline']))
    model_dropout_loaded = LeNet5V1(use_dropout=True)
    model_dropout_loaded.load_state_dict(torch.load(MODEL_SAVE_PATHS['dropout']))
    model_l2_loaded = LeNet5V1()
    model_l2_loaded.load_state_dict(torch.load(MODEL_SAVE_PATHS['l2_regularization']))
    model_l2_optimized_loaded = LeNet5V1()
    model_l2_optimized_loaded.load_state_dict(torch.load(MODEL_PATH / "lenet5v1_l2_optimized.pth"))
    model_batch_norm_loaded = LeNet5V1(use_batch_norm=True)
    model_batch_norm_loaded.load_state_dict(torch.load(MODEL_SAVE_PATHS['batch_norm']))
    for key, value in model_baseline.state_dict().items():
        assert torch.equal(model_baseline_loaded.state_dict()[key], value)


def test_train_model_honours_the_optimizer_and_any_metric(data_dir):
    train, val, _ = make_dataloaders(data_dir=data_dir, shuffle_seed=0)
    train, val = _tiny(train, 10), _tiny(val, 5)
    used = []

    class SpySGD(SGD):
        def __init__(self, params, lr, weight_decay):
            used.append((lr, weight_decay))
            super().__init__(params, lr=lr, weight_decay=weight_decay)

    plain_accuracy = lambda preds, target: (preds == target).float().mean()  # noqa: E731
    torch.manual_seed(0)
    sgd_model = LeNet5V1()
    train_accs, val_accs = train_model(sgd_model, train, val, 1, SpySGD, plain_accuracy, 0.5)
    assert used == [(1e-3, 0.5)]
    assert 0.0 <= train_accs[0] <= 1.0 and 0.0 <= val_accs[0] <= 1.0
    torch.manual_seed(0)
    adam_model = LeNet5V1()
    train_model(adam_model, train, val, 1, Adam, plain_accuracy)
    assert not torch.equal(sgd_model.feature[0].weight, adam_model.feature[0].weight)
