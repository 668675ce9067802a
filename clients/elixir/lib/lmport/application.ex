defmodule LMPort.Application do
  @moduledoc """
  The `:lmport` application. It starts `LMPort.Supervisor` with one `LMPort.Worker` per entry of
  `config :lmport, workers: [[name: MyApp.LLM, worker_args: [...]], ...]` (none by default), and the `:pg`
  scope `LMPort.PG` in which `LMPort.Pool`s with a `:group` meet across nodes; stopping the application
  shuts every worker down and kills its process group.
  """
  use Application

  @impl true
  def start(_type, _args) do
    workers = Enum.map(Application.get_env(:lmport, :workers, []), &{LMPort.Worker, &1})
    children = [%{id: :pg, start: {:pg, :start_link, [LMPort.PG]}} | workers]
    Supervisor.start_link(children, strategy: :one_for_one, name: LMPort.Supervisor)
  end
end
