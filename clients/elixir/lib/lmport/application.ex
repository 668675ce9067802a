defmodule LMPort.Application do
  @moduledoc """
  The `:lmport` application. It starts `LMPort.Supervisor` with one `LMPort.Worker` per entry of
  `config :lmport, workers: [[name: MyApp.LLM, worker_args: [...]], ...]` (none by default); stopping the
  application shuts every worker down and kills its process group.
  """
  use Application

  @impl true
  def start(_type, _args) do
    children = Enum.map(Application.get_env(:lmport, :workers, []), &{LMPort.Worker, &1})
    Supervisor.start_link(children, strategy: :one_for_one, name: LMPort.Supervisor)
  end
end
