"""Every parallelism script refuses bad input with one line and exit code 2, before starting any process."""
import pytest

from parallelism import data_parallel, pipeline_parallel, planner, router, scaling, tensor_parallel, vllm_parallel


@pytest.mark.parametrize("main,argv,message", [
    (tensor_parallel.main, ["--max-tokens", "1"], "--max-tokens"),
    (tensor_parallel.main, ["--check", "--random-weights"], "drop --random-weights"),
    (pipeline_parallel.main, ["--max-tokens", "0"], "--max-tokens"),
    (planner.main, ["--num-gpus", "0"], "--num-gpus"),
    (scaling.main, ["--tensor-parallel-sizes", "0"], "--tensor-parallel-sizes"),
    (data_parallel.main, ["--num-replicas", "1"], "--num-replicas"),
    (router.main, ["--num-replicas", "0"], "--num-replicas"),
    (vllm_parallel.main, ["offline", "--layouts", "2"], "TPxPP"),
])
def test_bad_input_is_one_line_and_exit_2(main, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
