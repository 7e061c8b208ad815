from epsanet.cli import main


def test_models_lists_params_and_gflops(capsys):
    assert main(['models']) == 0
    out = capsys.readouterr().out
    assert '| epsanet50 ' in out and '22,561,715' in out and '3.62' in out
    assert '49,592,198' in out and '8.97' in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert 'COMMAND' in capsys.readouterr().out
